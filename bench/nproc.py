"""compute.nproc: the extract and finetune stages as 1 process and as N (torchrun), side by side.

In a temporary folder that links this project's prepared digits (run `dvc repro prepare`, or
`make repro`, first), with this project's params plus the overrides below:
- extract with nproc 1, then N: wall time of each stage command (torchrun's start-up included)
  and whether the features are byte-identical;
- train_head once, then finetune (--epochs, default 1) with nproc 1, then N: wall time, the
  largest weight difference, and both val accuracies.
On a CPU the processes share its cores (compute.threads auto gives each its share), so expect
no speed-up here; the point of nproc is several GPUs. The last line holds the ratios.

    python bench/nproc.py
    python bench/nproc.py --nproc 2 --epochs 1 --set compute.device=cuda   # on a 2-GPU machine
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from headstart.checkpoints import load_checkpoint

PROJECT = Path(__file__).resolve().parents[1]
DATA = "data/digits"
STAGES = {
    "extract": [DATA, "data/prepared", "data/features"],
    "train_head": ["data/features", "models/head.pt", "dvclive/train_head"],
    "finetune": [DATA, "data/prepared", "models/head.pt", "models/finetuned.pt", "live"],
}


def write_params(folder: Path, overrides: dict[str, object]) -> None:
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        params[section][key] = value
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage(folder: Path, name: str) -> float:
    """Seconds for `python stages/<name>.py ...` in `folder`, as dvc would run it."""
    command = [sys.executable, str(PROJECT / "stages" / f"{name}.py"), *STAGES[name]]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=folder, stderr=subprocess.PIPE, text=True)
    if result.returncode:
        raise SystemExit(f"{name} failed in {folder}:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--set", nargs="*", default=[], help="more params, e.g. compute.device=cuda"
    )
    args = parser.parse_args()
    for needed in (DATA, "data/prepared"):
        if not (PROJECT / needed).exists():
            raise SystemExit(f"{PROJECT / needed}: missing; run `dvc repro prepare` first")
    overrides = {"finetune.epochs": args.epochs, "finetune.patience": args.epochs}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    with tempfile.TemporaryDirectory(prefix="bench-nproc-") as root:
        runs = {}
        for nproc in (1, args.nproc):
            folder = Path(root) / f"nproc{nproc}"
            (folder / "data").mkdir(parents=True)
            for linked in (DATA, "data/prepared"):
                os.symlink(PROJECT / linked, folder / linked)
            write_params(folder, {**overrides, "compute.nproc": nproc})
            extract = run_stage(folder, "extract")
            runs[nproc] = {"folder": folder, "extract": extract}
        one, many = runs[1], runs[args.nproc]
        features = sorted(p.name for p in (one["folder"] / "data/features").glob("*.npy"))
        identical = all(
            (one["folder"] / "data/features" / n).read_bytes()
            == (many["folder"] / "data/features" / n).read_bytes()
            for n in features
        )
        # One head for both fine-tuning runs: the nproc 1 run's.
        run_stage(one["folder"], "train_head")
        shutil.copytree(one["folder"] / "models", many["folder"] / "models")
        for run in (one, many):
            run["finetune"] = run_stage(run["folder"], "finetune")
            run["state"], run["meta"] = load_checkpoint(run["folder"] / "models/finetuned.pt")
        worst = max(
            (one["state"][k].float() - many["state"][k].float()).abs().max().item()
            for k in one["state"]
        )
    for stage in ("extract", "finetune"):
        print(
            f"{stage}: nproc 1 {one[stage]:.1f} s, nproc {args.nproc} {many[stage]:.1f} s "
            f"({one[stage] / many[stage]:.2f}x)"
        )
    print(f"features byte-identical: {identical}")
    accuracies = [run["meta"]["summary"]["val_accuracy"] for run in (one, many)]
    print(
        f"fine-tuned weights differ by up to {worst:.2e}; val accuracy {{:.4f}} vs {{:.4f}}".format(
            *accuracies
        )
    )
    print(
        f"speedup_extract={one['extract'] / many['extract']:.2f} "
        f"speedup_finetune={one['finetune'] / many['finetune']:.2f} identical_features={identical}"
    )


if __name__ == "__main__":
    main()
