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
block without augmentation. The last line is the no-op time at the largest fully run count
(with none, `noop_seconds_up_to_extract=`: the no-op `dvc repro extract` at the largest count).
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
from pathlib import Path

from project import make_repo, sh, stage_costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--full-up-to", type=int, default=10000)
    parser.add_argument("--backbone", default="mobilenet_v3_small")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--evaluate-param", default="evaluate.calibrate=false", help="'' to skip that check"
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
    noop_at_largest = noop_up_to_extract = None
    for count in args.counts:
        shutil.rmtree(work / f"run_{count}", ignore_errors=True)
        repo = make_repo(work / f"run_{count}", overrides, photos=count)
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
        else:
            noop_up_to_extract = noop_s
        if full and args.evaluate_param:
            key, value = args.evaluate_param.split("=")
            changed = sh(repo, "dvc", "exp", "run", "-S", f"{key}={value}")
            reran = ", ".join(sorted(set(re.findall(r"Running stage '([^']+)'", changed))))
            reran = reran or f"nothing: is {key} already {value} in params.yaml?"
        cells = []
        for stage in ("prepare", "extract", "train_head", "finetune", "evaluate"):
            seconds, peak = costs.get(stage, (None, None))
            cells.append(f"{seconds:6.1f}s {peak:4d}M" if seconds is not None else f"{'-':>13}")
        print(f"{count:>7} {' '.join(cells)} {repro_s:>8.1f} {noop_s:>8.2f}  {reran}", flush=True)
    print("(per stage: wall seconds and peak memory of the stage process, MiB)")
    if noop_at_largest is not None:
        print(f"noop_seconds={noop_at_largest:.2f}")
    else:  # no count ran the whole pipeline: the no-op `dvc repro extract` at the largest
        print(f"noop_seconds_up_to_extract={noop_up_to_extract:.2f}")


if __name__ == "__main__":
    main()
