"""A throw-away git + DVC copy of this project, for benchmarks that run the real `dvc`.

The copy has this project's dvc.yaml, params.yaml (with overrides), stages, src and the shipped
weights; data comes from the pipeline's own digits stage or from generated photos.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from synthetic import make_photos

PROJECT = Path(__file__).resolve().parents[1]
STAGE_END = re.compile(r"done in ([0-9.]+) s, peak memory ([0-9]+) MiB")


def sh(repo: Path, *command: str) -> str:
    """Run `command` in `repo` with this environment's tools first on PATH; its output, or exit
    with it if the command fails."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONPATH=str(repo / "src"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    result = subprocess.run(
        command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = result.stdout  # stages' logs interleaved with DVC's "Running stage" lines
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed in {repo}:\n{output[-4000:]}")
    return output


def stage_costs(output: str) -> dict[str, tuple[float, int]]:
    """{stage: (seconds, peak MiB)} from `dvc repro` output, from the line every stage ends
    with (its own work, without Python's start-up)."""
    costs, stage = {}, None
    for line in output.splitlines():
        started = re.match(r"Running stage '([^']+)'", line)
        if started:
            stage = started.group(1)
        ended = STAGE_END.search(line)
        if ended and stage:
            costs[stage] = (float(ended.group(1)), int(ended.group(2)))
    return costs


def make_repo(root: Path, overrides: dict, photos: int | None = None) -> Path:
    """A git + DVC repository at root/repo, committed. `overrides`: {"section.key": value}
    for params.yaml. `photos`: that many generated 400x300 JPEGs in data/photos (set
    `data.dir: data/photos` in overrides to use them); None: the built-in digits."""
    repo = root / "repo"
    repo.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(PROJECT / name, repo / name)
    for name in ("stages", "src", "pretrained"):
        shutil.copytree(
            PROJECT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    if photos is not None:
        make_photos(repo / "data" / "photos", photos)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("/data/photos\n")
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=bench", "-c", "user.email=b@x", "commit", "-qm", "bench")
    return repo
