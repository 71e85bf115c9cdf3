"""dvc.yaml declares what each stage's script really depends on, statically.

DVC reruns a stage only when a listed dependency or param changes. A module the script imports
but dvc.yaml does not list lets a code change go unnoticed (stale outputs, a wrong run-cache
hit); a params key the script reads but dvc.yaml does not list does the same for a setting.

Code: every headstart module a stage's script imports, directly or through other headstart
modules, at the top of a file or inside a function, must be in the stage's `deps`, except:
  - headstart/__init__.py: a docstring and the version;
  - headstart/errors.py: exception classes, whose messages never reach an output;
  - headstart/params.py: parses and validates params.yaml (the values a stage reads are
    covered by its `params:` list, checked below);
  - headstart/stage.py: logging, error messages and exit codes, never an output.
Imports are not followed through those four, and imports under `if TYPE_CHECKING:` (which
never run) do not count. The import graph is read with `ast`, so nothing is executed.

Params: every `load_params().<section>` and `<section>.<key>` the script reads must be covered
by the stage's `params:` list (the section, or that key); a whole section used as a value
(`as_dict(params.backbone)`) needs the whole section.
"""

from __future__ import annotations

import ast
import copy
import re
import sys
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
PACKAGE = PROJECT / "src" / "headstart"
NOT_OUTPUT_SHAPING = (
    "__init__.py",
    "choices.py",
    "errors.py",
    "params.py",
    "params_stages.py",
    "params_types.py",
    "stage.py",
)


def _load_yaml(name: str) -> dict:
    return yaml.safe_load((PROJECT / name).read_text(encoding="utf-8"))


def _script(stage: dict) -> Path:
    cmd = stage["cmd"] if isinstance(stage["cmd"], str) else " ".join(stage["cmd"])
    found = re.findall(r"stages/\w+\.py", cmd)
    assert len(found) == 1, f"expected one stages/<name>.py in the command: {cmd!r}"
    return PROJECT / found[0]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_file(module: str) -> Path | None:
    """headstart.x -> src/headstart/x.py (or x/__init__.py); None outside the package."""
    parts = module.split(".")
    if parts[0] != "headstart":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    raise AssertionError(f"import of {module}: no such module under {PACKAGE}")


def headstart_imports(path: Path) -> set[Path]:
    """Files of the headstart modules `path` imports anywhere (top level or in a function)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skipped = set()  # nodes under `if TYPE_CHECKING:`
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                skipped.update(ast.walk(child))
    in_package = path.parent == PACKAGE
    found: set[Path] = set()
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: only meaningful inside the package
                assert in_package and node.level == 1, f"{path}: unexpected relative import"
                module = "headstart" + (f".{node.module}" if node.module else "")
            else:
                module = node.module or ""
            # `from headstart import x` imports the module headstart.x when there is one.
            names = [module] + [
                f"{module}.{alias.name}"
                for alias in node.names
                if module == "headstart" and (PACKAGE / f"{alias.name}.py").is_file()
            ]
        else:
            continue
        for name in names:
            file = _module_file(name)
            if file is not None:
                found.add(file)
    return found


def shaping_modules(script: Path) -> set[str]:
    """Repository paths of every headstart module `script` imports, transitively, that can
    change its outputs (all but NOT_OUTPUT_SHAPING, which are not followed either)."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for module in headstart_imports(todo.pop()):
            if module not in seen and module.name not in NOT_OUTPUT_SHAPING:
                seen.add(module)
                todo.append(module)
    return {module.relative_to(PROJECT).as_posix() for module in seen}


def _is_load_params(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name | ast.Attribute)
        and (getattr(node.func, "id", None) or getattr(node.func, "attr", None)) == "load_params"
    )


def params_read(script: Path) -> set[tuple[str, str | None]]:
    """(section, key) pairs the script reads from load_params(); key None: the whole section;
    ("*", None): the whole params object escapes (passed or stored), so anything may be read."""
    tree = ast.parse(script.read_text(encoding="utf-8"), filename=str(script))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    roots: set[str] = set()  # names bound to load_params()
    sections: dict[str, str] = {}  # names bound to one section, e.g. ft = params.finetune
    for _ in range(2):  # twice: `params = load_params()` may come after its use in the walk
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
            ):
                continue
            name, value = node.targets[0].id, node.value
            if _is_load_params(value):
                roots.add(name)
            elif isinstance(value, ast.Attribute) and (
                _is_load_params(value.value)
                or (isinstance(value.value, ast.Name) and value.value.id in roots)
            ):
                sections[name] = value.attr

    def key_of(node: ast.AST) -> str | None:
        """The attribute read on `node` (node.<key>), or None if node is used whole."""
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute) and parent.value is node:
            return parent.attr
        return None

    def is_binding(node: ast.AST) -> bool:
        parent = parents.get(node)
        return isinstance(parent, ast.Assign) and node in parent.targets

    reads: set[tuple[str, str | None]] = set()
    for node in ast.walk(tree):
        is_root = _is_load_params(node) or (
            isinstance(node, ast.Name) and node.id in roots and not is_binding(node)
        )
        if is_root:
            section = key_of(node)
            if section is None:
                if not (_is_load_params(node) and isinstance(parents.get(node), ast.Assign)):
                    reads.add(("*", None))  # the whole params object used as a value
                continue
            attribute = parents[node]
            if isinstance(parents.get(attribute), ast.Assign) and key_of(attribute) is None:
                continue  # `ft = params.finetune`: counted where ft is read
            reads.add((section, key_of(attribute)))
        elif isinstance(node, ast.Name) and node.id in sections and not is_binding(node):
            reads.add((sections[node.id], key_of(node)))
    return reads


def find_gaps(stages: dict, params: dict) -> list[str]:
    """Every missing dependency or param, one line each: '<stage>: ...'."""
    gaps = []
    for name, stage in stages.items():
        script = _script(stage)
        deps = [str(dep) for dep in stage.get("deps", [])]

        def declared(path: str, deps=deps) -> bool:
            return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)

        required = {script.relative_to(PROJECT).as_posix()} | shaping_modules(script)
        for path in sorted(required):
            if not declared(path):
                gaps.append(f"{name}: deps lacks {path}")

        listed = {entry for entry in stage.get("params", []) if isinstance(entry, str)}
        for section, key in sorted(params_read(script), key=lambda r: (r[0], r[1] or "")):
            if section == "*":
                gaps.append(f"{name}: {script.name} passes the whole params object on")
            elif section in listed:
                continue
            elif key is not None and f"{section}.{key}" not in listed:
                gaps.append(f"{name}: params lacks {section}.{key}")
            elif key is None:
                missing = [k for k in params.get(section, {}) if f"{section}.{k}" not in listed]
                if missing or section not in params:
                    gaps.append(f"{name}: params lacks {section} (used whole)")
    return gaps


def test_every_stage_declares_the_code_and_params_it_reads():
    gaps = find_gaps(_load_yaml("dvc.yaml")["stages"], _load_yaml("params.yaml"))
    assert gaps == [], "dvc.yaml misses:\n" + "\n".join(gaps)


def test_the_image_folder_is_a_dependency_of_prepare_alone():
    """Every other stage that reads images (its command takes ${data.dir}) depends on
    data/prepared, whose index.csv records each image's sha256: a changed image reruns it
    through prepare, and DVC hashes the folder once per run, not once per stage."""
    stages = _load_yaml("dvc.yaml")["stages"]
    with_folder = sorted(name for name, stage in stages.items() if "${data.dir}" in stage["deps"])
    assert with_folder == ["prepare"]
    readers = [name for name, stage in stages.items() if "${data.dir}" in stage["cmd"]]
    assert {"prepare", "extract", "finetune", "evaluate"} <= set(readers)
    for name in readers:
        assert name == "prepare" or "data/prepared" in stages[name]["deps"], name
    assert "data/prepared" in stages["prepare"]["outs"]


def test_the_analysis_sees_each_stage_read_something():
    """Guards the guard: if the parsing silently found nothing, the test above would pass."""
    stages = _load_yaml("dvc.yaml")["stages"]
    for name in ("prepare", "extract", "train_head", "finetune", "evaluate"):
        script = _script(stages[name])
        assert "src/headstart/io.py" in shaping_modules(script), name
        assert params_read(script), name
    finetune = _script(stages["finetune"])
    assert {"src/headstart/train.py", "src/headstart/model.py"} <= shaping_modules(finetune)
    assert {("finetune", None), ("backbone", None), ("compute", "nproc")} <= params_read(finetune)
    evaluate = _script(stages["evaluate"])
    assert {("compute", "device"), ("inference", "batch_size")} <= params_read(evaluate)
    assert ("data", "seed") in params_read(_script(stages["prepare"]))


@pytest.mark.parametrize(
    ("stage", "remove", "expected"),
    [
        (
            "finetune",
            ("deps", "src/headstart/train.py"),
            "finetune: deps lacks src/headstart/train.py",
        ),
        ("finetune", ("deps", "stages/finetune.py"), "finetune: deps lacks stages/finetune.py"),
        ("finetune", ("params", "compute"), "finetune: params lacks compute (used whole)"),
        ("evaluate", ("params", "compute.device"), "evaluate: params lacks compute.device"),
        ("finetune", ("params", "finetune"), "finetune: params lacks finetune (used whole)"),
        ("prepare", ("params", "data.seed"), "prepare: params lacks data.seed"),
    ],
)
def test_a_removed_declaration_is_reported(stage, remove, expected):
    stages = copy.deepcopy(_load_yaml("dvc.yaml")["stages"])
    field, entry = remove
    assert entry in stages[stage][field]
    stages[stage][field].remove(entry)
    assert expected in find_gaps({stage: stages[stage]}, _load_yaml("params.yaml"))


def test_the_whole_params_object_escaping_is_reported(tmp_path, monkeypatch):
    script = tmp_path / "stages" / "leaky.py"
    script.parent.mkdir()
    script.write_text(
        "from headstart.params import load_params\n"
        "def main():\n"
        "    params = load_params()\n"
        "    helper(params)\n"
        "    return params.head.lr\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PROJECT", tmp_path)
    stage = {"cmd": "python stages/leaky.py", "deps": ["stages/leaky.py"], "params": ["head"]}
    assert find_gaps({"leaky": stage}, {"head": {"lr": 0.1}}) == [
        "leaky: leaky.py passes the whole params object on"
    ]
