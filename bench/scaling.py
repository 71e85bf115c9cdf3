"""How the pipeline's cost grows with the number of images, under the real `dvc repro`.

For each count, a fresh git + DVC copy of this project in a temporary folder, with that many
generated 400x300 JPEGs (bench/synthetic.py) as `data.dir`:
- `dvc repro` of the whole pipeline (counts up to --full-up-to; above it, up to extract only):
  each stage's wall time and peak memory, from the line every stage ends with;
- `dvc repro` again with nothing changed (target: under 3 s at 10,000 images);
- a change to an evaluate-only param (--evaluate-param): which stages reran (target: evaluate).
The extract stage streams features to disk, so its peak memory should not grow with the count.

    python bench/scaling.py                                   # 1k, 10k, 50k at 224 px
    python bench/scaling.py --counts 1000 10000 --size 96

Defaults keep the run short on a 2-core CPU: mobilenet_v3_small with random weights at 224 px
(the streaming and caching code is the same for every backbone), 1 fine-tune epoch on the top
block without augmentation. The last line is the no-op time at the largest fully run count.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from synthetic import make_photos

PROJECT = Path(__file__).resolve().parents[1]
STAGE_END = re.compile(r"done in ([0-9.]+) s, peak memory ([0-9]+) MiB")


def sh(repo: Path, *command: str) -> str:
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
    """{stage: (seconds, peak MiB)} from `dvc repro` output."""
    costs, stage = {}, None
    for line in output.splitlines():
        started = re.match(r"Running stage '([^']+)'", line)
        if started:
            stage = started.group(1)
        ended = STAGE_END.search(line)
        if ended and stage:
            costs[stage] = (float(ended.group(1)), int(ended.group(2)))
    return costs


def make_repo(root: Path, count: int, overrides: dict) -> Path:
    repo = root / "repo"
    repo.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(PROJECT / name, repo / name)
    for name in ("stages", "src", "pretrained"):
        shutil.copytree(
            PROJECT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    make_photos(repo / "data" / "photos", count)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--full-up-to", type=int, default=10000)
    parser.add_argument("--backbone", default="mobilenet_v3_small")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--evaluate-param", default="evaluate.calibrate=true", help="'' to skip that check"
    )
    parser.add_argument("--work", type=Path, help="keep the repositories and images here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="headstart-scaling-"))
    overrides = {
        "data.dir": "data/photos",
        "backbone.name": args.backbone,
        "backbone.weights": args.weights,
        "backbone.image_size": args.size,
        "head.epochs": 20,
        "finetune.epochs": 1,
        "finetune.unfreeze": 1,
        "finetune.augment": "none",
    }
    print(f"{args.backbone} ({args.weights} weights) at {args.size} px, generated 400x300 JPEGs")
    print(
        f"{'images':>7} {'prepare':>13} {'extract':>13} {'train_head':>13} {'finetune':>13} "
        f"{'evaluate':>13} {'repro s':>8} {'no-op s':>8}  evaluate-param change reran"
    )
    noop_at_largest = None
    for count in args.counts:
        shutil.rmtree(work / f"run_{count}", ignore_errors=True)
        repo = make_repo(work / f"run_{count}", count, overrides)
        full = count <= args.full_up_to
        start = time.perf_counter()
        output = sh(repo, "dvc", "repro", *([] if full else ["extract"]))
        repro_s = time.perf_counter() - start
        costs = stage_costs(output)
        start = time.perf_counter()
        again = sh(repo, "dvc", "repro", *([] if full else ["extract"]))
        noop_s = time.perf_counter() - start
        assert "Running stage" not in again, again
        reran = "-"
        if full:
            noop_at_largest = noop_s
        if full and args.evaluate_param:
            key, value = args.evaluate_param.split("=")
            changed = sh(repo, "dvc", "exp", "run", "-S", f"{key}={value}")
            reran = ", ".join(sorted(set(re.findall(r"Running stage '([^']+)'", changed))))
        cells = []
        for stage in ("prepare", "extract", "train_head", "finetune", "evaluate"):
            seconds, peak = costs.get(stage, (None, None))
            cells.append(f"{seconds:6.1f}s {peak:4d}M" if seconds is not None else f"{'-':>13}")
        print(f"{count:>7} {' '.join(cells)} {repro_s:>8.1f} {noop_s:>8.2f}  {reran}", flush=True)
    print("(per stage: wall seconds and peak memory of the stage process, MiB)")
    print(f"noop_seconds={noop_at_largest:.2f}" if noop_at_largest is not None else "noop_seconds=")


if __name__ == "__main__":
    main()
