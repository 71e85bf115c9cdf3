"""The docs stay true to the tree: links resolve, the module map names every module, and the
front page and the stage scripts stay the size the layout promises (docs/architecture.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [
        PROJECT / "README.md",
        PROJECT / "CHANGELOG.md",
        PROJECT / "CONTRIBUTING.md",
        PROJECT / "bench" / "RESULTS.md",
        *(PROJECT / "docs").glob("*.md"),
    ]
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """A Markdown heading's anchor as GitHub makes it: lower case, punctuation dropped,
    spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {_anchor(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(PROJECT).as_posix())
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading with that anchor in {file.name}")
    assert broken == [], f"{page.name}: " + "; ".join(broken)


def test_the_module_map_names_every_module():
    architecture = (PROJECT / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules = sorted(p.name for p in (PROJECT / "src" / "headstart").glob("*.py"))
    missing = [m for m in modules if m != "__init__.py" and f"`{m}`" not in architecture]
    assert missing == [], f"docs/architecture.md's module map lacks {missing}"


def test_the_front_page_and_the_stages_stay_small():
    assert len((PROJECT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250
    for script in (PROJECT / "stages").glob("*.py"):
        lines = len(script.read_text(encoding="utf-8").splitlines())
        assert lines <= 80, f"{script.name}: {lines} lines; move the work into src/headstart/"
    for module in (PROJECT / "src" / "headstart").glob("*.py"):
        lines = len(module.read_text(encoding="utf-8").splitlines())
        assert lines <= 450, f"{module.name}: {lines} lines; split it by job"
