"""The fine-tuning recipe on two datasets: each augmentation policy, layer-wise decay, weight
EMA and MixUp, with the same seeds; and the default head against logistic regression.

Datasets: the built-in digits (split by prepare, the committed data params) and real photo
crops (bench/photo_crops.py: one class per scikit-image photo, held-out crops from unseen parts
of each photo). Features are extracted once per dataset (the committed backbone and compute
params; photos at --photo-size px); then, through the stages' own functions, heads (`linear`,
the default, and `logreg`) over the seeds, and fine-tuning (the committed finetune params,
--epochs epochs) from the linear head of the same seed, once per recipe and seed. The EMA
decay is 1 - 1 / (steps an epoch): an average over about the last epoch. Prints test
accuracy, mean and spread (sample standard deviation over the seeds), per dataset and setting,
as each dataset ends; the last line names the best fine-tuning setting of each dataset.

    python bench/recipe.py                          # 3 seeds, 5 epochs
    python bench/recipe.py --seeds 2 --datasets digits --skip mixup
    python bench/recipe.py --datasets photos --only heads   # the heads only (no recipe matches)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from photo_crops import make_photo_crops

from headstart.builtin import write_digits
from headstart.extraction import extract_features
from headstart.finetuning import finetune
from headstart.heads import head_meta, read_features, train_head
from headstart.index import INDEX_HEADER, load_prepared, prepare_index
from headstart.inference import run_inference
from headstart.io import read_array, write_csv, write_json
from headstart.loaders import image_loader
from headstart.params import load_params
from headstart.transforms import decode_size, eval_transform, preprocessing

# Each dataset's natural policy: the base of the layer-decay, EMA and MixUp rows.
BASE = {"digits": "light", "photos": "photo"}


def recipes(dataset: str, steps_per_epoch: int) -> dict[str, dict]:
    base = BASE[dataset]
    ema = round(1.0 - 1.0 / steps_per_epoch, 4)
    return {
        "augment none": {"augment": "none"},
        "augment light": {"augment": "light"},
        "augment photo": {"augment": "photo"},
        "augment strong": {"augment": "strong"},
        f"{base} + layer_decay 0.7": {"augment": base, "layer_decay": 0.7},
        f"{base} + ema {ema:g}": {"augment": base, "ema": ema},
        f"{base} + mixup 0.2": {"augment": base, "mixup": 0.2},
    }


def prepared_folder(root: Path, dataset: str, params):
    if dataset == "digits":
        data = root / "digits"
        write_digits(data)
    else:
        data = make_photo_crops(root / "photos")
    prepared_dir = root / f"{dataset}-prepared"
    classes, rows, report = prepare_index(
        data, params.data.val_fraction, params.data.test_fraction, params.data.seed
    )
    write_csv(prepared_dir / "index.csv", INDEX_HEADER, rows)
    write_json(prepared_dir / "classes.json", classes)
    write_json(prepared_dir / "report.json", report)
    return load_prepared(data, prepared_dir), report


def _spread(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def run_dataset(root: Path, dataset: str, params, args, results: dict) -> None:
    prepared, report = prepared_folder(root, dataset, params)
    backbone = params.backbone
    if dataset == "photos":
        backbone = dataclasses.replace(backbone, image_size=args.photo_size)
    counts = {s: len(prepared.split(s).paths) for s in ("train", "val", "test")}
    print(f"{dataset}: {report['num_images']} images ({counts}), {len(prepared.classes)} classes")
    features_dir = root / f"{dataset}-features"
    extract_features(prepared, backbone, params.compute, params.inference, features_dir)
    features = read_features(features_dir)
    test_x = torch.from_numpy(read_array(features_dir / "test_features.npy"))
    test_y = read_array(features_dir / "test_labels.npy")

    def record(name: str, predicted: np.ndarray) -> None:
        accuracy = float((predicted == test_y).mean())
        results.setdefault(dataset, {}).setdefault(name, []).append(accuracy)

    heads = {}
    for kind in ("linear", "logreg"):
        for seed in range(args.seeds):
            head_params = dataclasses.replace(params.head, kind=kind, seed=seed)
            head, summary = train_head(features, head_params)
            with torch.inference_mode():
                record(f"head {kind}", head(test_x).argmax(1).numpy())
            if kind == "linear":
                heads[seed] = (head, head_meta(features, head_params, summary, {}))

    test_images = image_loader(
        prepared.root,
        prepared.split("test"),
        eval_transform(**preprocessing(features.meta)),
        decode_size=decode_size(features.meta),
        batch_size=params.inference.batch_size,
        num_workers=params.compute.num_workers,
    )
    steps_per_epoch = -(-counts["train"] // params.finetune.batch_size)
    for name, overrides in recipes(dataset, steps_per_epoch).items():
        if args.only and not any(word in name for word in args.only):
            continue
        if args.skip and any(word in name for word in args.skip):
            continue
        started = time.perf_counter()
        for seed in range(args.seeds):
            head, meta = heads[seed]
            ft = dataclasses.replace(params.finetune, seed=seed, epochs=args.epochs, **overrides)
            result = finetune(
                prepared, head.state_dict(), meta, backbone, params.compute, ft, scratch_dir=root
            )
            logits, _ = run_inference(result.model, test_images, torch.device("cpu"))
            record(f"fine-tuned, {name}", logits.argmax(1))
        seconds = (time.perf_counter() - started) / args.seeds
        print(
            f"  {dataset} {name}: {_spread(results[dataset][f'fine-tuned, {name}'])}, "
            f"{seconds:.0f} s a run",
            flush=True,
        )
    print_table(dataset, results[dataset])  # as each dataset ends: a long run shows them all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--photo-size", type=int, default=128)
    parser.add_argument("--datasets", default="digits,photos")
    parser.add_argument("--only", nargs="*", help="run only the recipes whose name has a word")
    parser.add_argument("--skip", nargs="*", help="skip the recipes whose name has a word")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    params = load_params()
    root = Path(tempfile.mkdtemp(prefix="headstart-recipe-"))
    results: dict[str, dict[str, list[float]]] = {}
    try:
        for dataset in args.datasets.split(","):
            run_dataset(root, dataset, params, args, results)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = []
    for dataset, settings in results.items():
        tuned = {n: statistics.mean(v) for n, v in settings.items() if n.startswith("fine")}
        if tuned:
            top = max(tuned, key=tuned.get)
            best.append(f"{dataset}: {top.removeprefix('fine-tuned, ')} {tuned[top]:.4f}")
    print(f"best fine-tuning setting by mean test accuracy: {'; '.join(best)}")


def print_table(dataset: str, settings: dict[str, list[float]]) -> None:
    print()
    print(f"{'dataset':<8}{'setting':<40}{'runs':>5}  {'test accuracy':>18}  each seed's")
    for name, values in settings.items():
        each = " ".join(f"{v:.4f}" for v in values)
        print(f"{dataset:<8}{name:<40}{len(values):>5}  {_spread(values):>18}  {each}")


if __name__ == "__main__":
    main()
