"""GPU check: the pipeline's speed on a CUDA GPU against the CPU, and whether GPU runs repeat.

On generated 400x300 JPEGs (bench/synthetic.py), the pipeline's stages (prepare, extract,
train_head, finetune, evaluate: each stage's own main(), with the arguments dvc.yaml gives it)
run three times, each in a fresh process and folder:
- twice with compute.device: cuda, same params: are the features (data/features/*.npy) and the
  models (models/*.pt) byte-identical (sha256)?
- once with compute.device: cpu, on the first --cpu-images of the same images (default 1000, as
  the CPU is slow) and the same epochs: the GPU's speed-up, and the test accuracies side by
  side (when the CPU run has fewer images, their difference includes that).
images/s: extract, all images over the stage's wall time; fine-tune, training images x epochs
over the stage's wall time (model set-up and the validation pass of every epoch included).
CUDA is initialised before the timed stages. The last line:
gpu_speedup_extract=... gpu_speedup_finetune=... gpu_identical=True|False

    python bench/gpu_check.py                        # 5000 images, 3 fine-tune epochs
    python bench/gpu_check.py --images 2000 --epochs 2 --keep
    python bench/gpu_check.py --dry-run              # tiny and CPU only: checks the code path

Without a CUDA device it says so in one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import multiprocessing
import os
import shlex
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml
from synthetic import make_photos

PROJECT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "extract", "train_head", "finetune", "evaluate")


def make_run_folder(folder: Path, photos: Path, overrides: dict) -> Path:
    """folder/params.yaml (the project's, with `overrides` and data.dir = photos) and dvc.yaml."""
    folder.mkdir(parents=True)
    shutil.copy(PROJECT / "dvc.yaml", folder / "dvc.yaml")
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    for dotted, value in {**overrides, "data.dir": str(photos)}.items():
        section, key = dotted.split(".")
        params[section][key] = value
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


def run_pipeline(folder: Path) -> dict:
    """Run the stages in `folder` (meant for a fresh process); their timings and results."""
    os.environ["TQDM_DISABLE"] = "1"  # read when tqdm is imported: before headstart
    import torch

    from headstart.stage import run

    logging.basicConfig(level=logging.WARNING)  # the stages' INFO lines would drown the report
    os.chdir(folder)
    params = yaml.safe_load(Path("params.yaml").read_text())
    if params["compute"]["device"].startswith("cuda"):
        torch.zeros(1, device=params["compute"]["device"])  # CUDA start-up, before any timing
    pipeline = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    sys.path.append(str(PROJECT / "stages"))  # as `python stages/<name>.py` has it: _bootstrap
    seconds = {}
    for name in STAGES:
        # "python stages/extract.py ${data.dir} data/prepared ..." -> the script and its argv
        cmd = pipeline[name]["cmd"].replace("${data.dir}", params["data"]["dir"])
        script, *argv = shlex.split(cmd)[1:]
        if "--audit" in argv:  # the audit (cleanlab, CPU-only work) is not run here
            del argv[argv.index("--audit") : argv.index("--audit") + 2]
        spec = importlib.util.spec_from_file_location(f"stage_{name}", PROJECT / script)
        stage = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(stage)
        start = time.perf_counter()
        if run(stage.main, argv) != 0:
            raise SystemExit(f"stage {name} failed in {folder}")
        seconds[name] = time.perf_counter() - start

    data = json.loads(Path("metrics/data.json").read_text())
    epochs = json.loads(Path("dvclive/finetune/metrics.json").read_text())["step"] + 1
    evaluated = json.loads(Path("metrics/evaluate.json").read_text())
    outputs = sorted([*Path("data/features").glob("*.npy"), *Path("models").glob("*.pt")])
    return {
        "extract": data["images"] / seconds["extract"],  # images/s
        "finetune": data["train"] * epochs / seconds["finetune"],
        "images": data["images"],
        "sha256": {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in outputs},
        "accuracy": evaluated["finetuned"]["accuracy"],
    }


def in_fresh_process(function, *args):
    """function(*args) in a new Python process: nothing carries over from one run to the next."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def report(runs: dict[str, dict], note: str) -> None:
    """Print the table, the speed-ups, the GPU runs' sameness and the accuracies."""
    print(f"{'run':<6} {'images':>6} {'extract img/s':>14} {'fine-tune img/s':>16} {'test acc':>9}")
    for name, run in runs.items():
        print(
            f"{name:<6} {run['images']:>6} {run['extract']:>14.1f} {run['finetune']:>16.1f} "
            f"{run['accuracy']:>9.4f}"
        )
    gpu_runs, cpu = (runs["gpu 1"], runs["gpu 2"]), runs["cpu"]
    speedup = {
        stage: sum(run[stage] for run in gpu_runs) / 2 / cpu[stage]
        for stage in ("extract", "finetune")
    }
    print(
        f"GPU speed-up over the CPU (mean of the two GPU runs): extract {speedup['extract']:.1f}x,"
        f" fine-tune {speedup['finetune']:.1f}x"
    )
    first, second = (run["sha256"] for run in gpu_runs)
    if not first:
        raise SystemExit("gpu_check: no data/features/*.npy or models/*.pt to compare")
    differ = sorted(
        path for path in first.keys() | second.keys() if first.get(path) != second.get(path)
    )
    same = "byte-identical" if not differ else f"{len(differ)} differ: {', '.join(differ)}"
    print(f"the two GPU runs' {len(first)} feature and model files: {same}")
    gpu_accuracy = sum(run["accuracy"] for run in gpu_runs) / 2
    print(
        f"fine-tuned test accuracy: GPU {gpu_accuracy:.4f}, CPU {cpu['accuracy']:.4f}, "
        f"difference {gpu_accuracy - cpu['accuracy']:+.4f}{note}"
    )
    print(
        f"gpu_speedup_extract={speedup['extract']:.2f} "
        f"gpu_speedup_finetune={speedup['finetune']:.2f} gpu_identical={not differ}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="generated images (10 classes)")
    parser.add_argument("--cpu-images", type=int, default=1000, help="the CPU run's share")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tune epochs (every one runs)")
    parser.add_argument("--size", type=int, default=224, help="backbone input size, px")
    parser.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="compute.num_workers"
    )
    parser.add_argument("--keep", action="store_true", help="keep the images and the runs")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the code path: tiny fixed sizes, random weights, the CPU in place of CUDA",
    )
    args = parser.parse_args(argv)
    overrides = {
        "backbone.weights": "pretrained",  # the shipped ImageNet weights: accuracies that mean much
        "backbone.image_size": args.size,
        "compute.num_workers": args.workers,
        "finetune.epochs": args.epochs,
        "finetune.patience": args.epochs,
    }
    photo_size, gpu = (400, 300), "cuda"
    if args.dry_run:
        args.images, args.cpu_images, photo_size, gpu = 100, 60, (64, 48), "cpu"
        overrides.update(
            {
                "backbone.weights": "none",
                "backbone.image_size": 32,
                "compute.num_workers": 0,
                "compute.threads": 1,  # tiny tensors: more threads only spin
                "head.epochs": 3,
                "finetune.epochs": 1,
                "finetune.patience": 1,
            }
        )
        title = "dry run, the CPU standing in for CUDA"
    else:
        import torch

        if not torch.cuda.is_available():
            print(
                "gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a "
                "machine with an NVIDIA GPU, or with --dry-run to check the code path on the CPU",
                file=sys.stderr,
            )
            return 2
        title = torch.cuda.get_device_name()
    cpu_images = min(args.cpu_images, args.images)

    work = Path(tempfile.mkdtemp(prefix="headstart-gpu-check-"))
    try:
        generate = {"size": photo_size, "workers": max(1, args.workers)}
        photos = make_photos(work / "photos", args.images, **generate)
        # The CPU's share is the same first images: generation is seeded by the image's index.
        cpu_photos = photos
        if cpu_images < args.images:
            cpu_photos = make_photos(work / "cpu_photos", cpu_images, **generate)
        runs = {}
        for name, device, images in (
            ("gpu 1", gpu, photos),
            ("gpu 2", gpu, photos),
            ("cpu", "cpu", cpu_photos),
        ):
            folder = work / name.replace(" ", "")
            make_run_folder(folder, images, {**overrides, "compute.device": device})
            start = time.perf_counter()
            runs[name] = in_fresh_process(run_pipeline, folder)
            seconds = time.perf_counter() - start
            print(f"{name}: the pipeline on {device} in {seconds:.0f} s", file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept the images and the runs in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(
        f"{title}: {args.images} generated {photo_size[0]}x{photo_size[1]} JPEGs (CPU: "
        f"{cpu_images}), {overrides['backbone.image_size']} px, "
        f"{overrides['finetune.epochs']} fine-tune epochs, "
        f"{overrides['compute.num_workers']} loader workers"
    )
    note = f" (the CPU run had {cpu_images} of the {args.images} images)"
    report(runs, note if cpu_images < args.images else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
