"""Skewed classes: class weights and the balanced sampler against neither, on a skewed copy
of the built-in digits.

Class k of the digits keeps 25^(-k/9) of its training images (digit 0 all of them, digit 9 a
25th: about 20:1 largest to smallest, printed); validation and test stay as prepare splits the full
digits, so both are balanced enough to measure every class. Features are extracted once (the
committed backbone params); then, through the stages' own functions, heads with
`head.class_weight` none and balanced over several seeds (and `head.kind: logreg` beside
them), and fine-tuning with `finetune.class_weight` none and balanced, and with
`finetune.sampler: balanced`, over fewer seeds (it costs more). Prints test balanced accuracy
and accuracy, mean and spread (sample standard deviation), per setting; the last line compares
balanced accuracy with and without the weights, and with the sampler.

    python bench/skewed.py                                  # 5 head seeds, 2 fine-tune seeds
    python bench/skewed.py --head-seeds 10 --finetune-seeds 3 --finetune-epochs 15
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from headstart.builtin import write_digits
from headstart.extraction import extract_features
from headstart.finetuning import finetune
from headstart.heads import head_meta, read_features, train_head
from headstart.index import INDEX_HEADER, load_prepared, prepare_index
from headstart.inference import run_inference
from headstart.io import read_array, write_csv, write_json
from headstart.loaders import image_loader
from headstart.metrics import classification_report
from headstart.params import load_params
from headstart.transforms import decode_size, eval_transform, preprocessing

RATIO = 25.0  # the share kept by the last class is 1 / RATIO (rounded up: about 20:1)


def skewed_digits(root: Path, seed: int) -> Path:
    """A pre-split folder: train skewed geometrically by class, val and test as prepare splits
    the full digits."""
    full = root / "digits"
    write_digits(full)
    _, rows, _ = prepare_index(full, 0.15, 0.15, seed)
    out = root / "skewed"
    kept: dict[str, int] = {}
    by_class: dict[str, list[str]] = {}
    for path, label, split, *_ in rows:
        if split == "train":
            by_class.setdefault(label, []).append(path)
        else:
            (out / split / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(full / path, out / split / label / Path(path).name)
    for label, paths in sorted(by_class.items()):
        share = RATIO ** (-int(label) / 9)
        keep = sorted(paths)[: max(1, math.ceil(len(paths) * share))]
        kept[label] = len(keep)
        (out / "train" / label).mkdir(parents=True, exist_ok=True)
        for path in keep:
            shutil.copy(full / path, out / "train" / label / Path(path).name)
    print("train images per class:", ", ".join(f"{k}: {v}" for k, v in kept.items()))
    print(f"train split largest:smallest {max(kept.values()) / min(kept.values()):.1f}:1")
    return out


def _spread(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-seeds", type=int, default=5)
    parser.add_argument("--finetune-seeds", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the table, not a thousand progress bars
    params = load_params()
    root = Path(tempfile.mkdtemp(prefix="headstart-skewed-"))
    data = skewed_digits(root, params.data.seed)
    prepared_dir = root / "prepared"
    classes, rows, report = prepare_index(data, 0.15, 0.15, params.data.seed)
    write_csv(prepared_dir / "index.csv", INDEX_HEADER, rows)
    write_json(prepared_dir / "classes.json", classes)
    write_json(prepared_dir / "report.json", report)
    prepared = load_prepared(data, prepared_dir)
    print(
        f"{report['num_images']} images, imbalance {report['imbalance_ratio']}:1 over all "
        f"splits; {params.backbone.name}"
    )
    features_dir = root / "features"
    extract_features(prepared, params.backbone, params.compute, params.inference, features_dir)
    features = read_features(features_dir)
    test_x = torch.from_numpy(read_array(features_dir / "test_features.npy"))
    test_y = read_array(features_dir / "test_labels.npy")

    results: dict[str, dict[str, list[float]]] = {}

    def record(name: str, predicted: np.ndarray) -> None:
        scores = classification_report(test_y, predicted, classes)
        entry = results.setdefault(name, {"balanced_accuracy": [], "accuracy": []})
        entry["balanced_accuracy"].append(scores["balanced_accuracy"])
        entry["accuracy"].append(scores["accuracy"])

    heads = {}
    for weight in ("none", "balanced"):
        for seed in range(args.head_seeds):
            head_params = dataclasses.replace(params.head, class_weight=weight, seed=seed)
            head, summary = train_head(features, head_params)
            with torch.inference_mode():
                record(f"head, class_weight {weight}", head(test_x).argmax(1).numpy())
            heads[(weight, seed)] = (head, head_meta(features, head_params, summary, {}))
            logreg_params = dataclasses.replace(head_params, kind="logreg")
            logreg, _ = train_head(features, logreg_params)
            with torch.inference_mode():
                record(f"head logreg, class_weight {weight}", logreg(test_x).argmax(1).numpy())

    steps = preprocessing(features.meta)
    test_images = image_loader(
        data,
        prepared.split("test"),
        eval_transform(**steps),
        decode_size=decode_size(features.meta),
        batch_size=params.inference.batch_size,
        num_workers=params.compute.num_workers,
    )
    settings = {
        "class_weight none": ("none", "shuffle"),
        "class_weight balanced": ("balanced", "shuffle"),
        "sampler balanced": ("none", "balanced"),
    }
    for name, (weight, sampler) in settings.items():
        for seed in range(args.finetune_seeds):
            head, meta = heads[(weight, seed)]  # LP-FT from the head of the same weighting
            ft = dataclasses.replace(
                params.finetune,
                class_weight=weight,
                sampler=sampler,
                seed=seed,
                epochs=args.finetune_epochs,
            )
            result = finetune(
                prepared,
                head.state_dict(),
                meta,
                params.backbone,
                params.compute,
                ft,
                scratch_dir=root,
            )
            logits, _ = run_inference(result.model, test_images, torch.device("cpu"))
            record(f"fine-tuned, {name}", logits.argmax(1))

    print()
    print(f"{'setting':<42}{'runs':>5}  {'test balanced accuracy':>24}  {'test accuracy':>18}")
    for name, scores in results.items():
        runs = len(scores["accuracy"])
        print(
            f"{name:<42}{runs:>5}  {_spread(scores['balanced_accuracy']):>24}  "
            f"{_spread(scores['accuracy']):>18}"
        )
    shutil.rmtree(root, ignore_errors=True)
    parts = []
    for model in ("head", "fine-tuned"):
        none = statistics.mean(results[f"{model}, class_weight none"]["balanced_accuracy"])
        balanced = statistics.mean(results[f"{model}, class_weight balanced"]["balanced_accuracy"])
        parts.append(f"{model} {none:.4f} -> {balanced:.4f} ({balanced - none:+.4f})")
    sampled = statistics.mean(results["fine-tuned, sampler balanced"]["balanced_accuracy"])
    parts.append(f"fine-tuned, sampler balanced {sampled:.4f}")
    print(f"balanced accuracy, class_weight none -> balanced: {'; '.join(parts)}")


if __name__ == "__main__":
    main()
