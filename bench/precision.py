"""bfloat16 extraction versus float32: does the fast path cost test accuracy?

One test split of the digits has 290 images, so one image is 0.34 points and a single split
cannot resolve the 0.3-point target. This script extracts the features of every indexed image
twice, in float32 and under bfloat16 autocast (what `precision: auto` runs on this CPU), then
for each of --splits random stratified 70/15/15 splits trains the linear head exactly as
train_head does (head params from params.yaml, early stopping on val) on both, and compares
test accuracy split by split: the mean difference over all splits is measured on
splits x 15% of the images.

    python bench/precision.py                # 40 splits of the digits
    python bench/precision.py --splits 10

Needs data/digits and data/prepared (`dvc repro prepare`). The last line is the mean
difference in points (bfloat16 minus float32) and its standard error.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from headstart.backbones import backbone_spec, build_backbone
from headstart.index import load_prepared
from headstart.inference import run_inference
from headstart.loaders import image_loader, tensor_batches
from headstart.params import load_params
from headstart.runtime import seed_everything, set_threads
from headstart.train import fit
from headstart.transforms import eval_transform, resolve_image_size


def stratified_split(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Indices of a 70/15/15 split with every class in every part."""
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held = max(1, round(0.15 * len(members)))
        parts["test"].append(members[:held])
        parts["val"].append(members[held : 2 * held])
        parts["train"].append(members[2 * held :])
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def head_test_accuracy(features, labels, split, num_classes: int, head_params) -> float:
    """train_head's linear head on `features`, early-stopped on val; accuracy on test."""
    generator = seed_everything(head_params.seed)

    def loader(part: str, batch_size: int, **options) -> DataLoader:
        rows = split[part]
        x, y = torch.from_numpy(features[rows]), torch.from_numpy(labels[rows])
        return tensor_batches(x, y, batch_size, **options)

    head = nn.Linear(features.shape[1], num_classes)
    groups = [
        {
            "params": list(head.parameters()),
            "lr": head_params.lr,
            "weight_decay": head_params.weight_decay,
        }
    ]
    fit(
        head,
        loader("train", head_params.batch_size, shuffle=True, generator=generator),
        loader("val", 1024),
        groups,
        epochs=head_params.epochs,
        patience=head_params.patience,
        label_smoothing=head_params.label_smoothing,
        device=torch.device("cpu"),
        desc="head",
    )
    with torch.inference_mode():
        logits = head(torch.from_numpy(features[split["test"]]))
    return float((logits.argmax(1).numpy() == labels[split["test"]]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/digits"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--splits", type=int, default=40)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    params = load_params()
    set_threads(params.compute.threads)
    prepared = load_prepared(args.data, args.prepared)
    spec = backbone_spec(params.backbone.name)
    size = resolve_image_size(params.backbone.image_size, spec, prepared.report)
    backbone = build_backbone(params.backbone.name, params.backbone.weights)
    loader = image_loader(
        args.data,
        prepared.images,
        eval_transform(size, spec.mean, spec.std, spec.interpolation, spec.crop_pct),
        decode_size=size,
        batch_size=params.inference.batch_size,
        num_workers=params.compute.num_workers,
    )
    features, seconds = {}, {}
    for name, precision in (("float32", None), ("bfloat16", torch.bfloat16)):
        start = time.perf_counter()
        features[name], labels = run_inference(
            backbone, loader, torch.device("cpu"), desc=f"extract {name}", precision=precision
        )
        seconds[name] = time.perf_counter() - start
    drift = np.abs(features["bfloat16"] - features["float32"]).max()
    print(
        f"{len(labels)} images at {size} px: extraction float32 {seconds['float32']:.1f} s, "
        f"bfloat16 {seconds['bfloat16']:.1f} s; largest feature difference {drift:.3g}"
    )

    differences = []
    for seed in range(args.splits):
        split = stratified_split(labels, seed)
        accuracy = {
            name: head_test_accuracy(f, labels, split, len(prepared.classes), params.head)
            for name, f in features.items()
        }
        differences.append(100 * (accuracy["bfloat16"] - accuracy["float32"]))
        print(
            f"split {seed}: {len(split['test'])} test images, head accuracy float32 "
            f"{accuracy['float32']:.4f}, bfloat16 {accuracy['bfloat16']:.4f}"
        )
    mean = float(np.mean(differences))
    error = float(np.std(differences, ddof=1) / np.sqrt(len(differences)))
    print(f"bfloat16 - float32 over {args.splits} splits: {mean:+.2f} points (+/- {error:.2f})")
    print(f"delta_points={mean:+.2f} standard_error={error:.2f}")


if __name__ == "__main__":
    main()
