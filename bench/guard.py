"""The unfamiliar-image guard on the pipeline's own model: what it flags and what it catches.

Runs the fine-tuned model (models/finetuned.pt, after `dvc repro`) over the prepared train, val
and test images once, and over the foreign sets evaluate uses (headstart.familiarity.FOREIGN:
uniform noise, solid colours, crops of scikit-image's photos), plus two harder ones made from
the data itself: its test images inverted (light ink on dark) and rotated 90 degrees. Then for
each k (evaluate.guard_neighbours) and flag rate (evaluate.guard_flag_rate) it builds the guard
as evaluate does and prints the share of test images flagged (ideally about the rate) beside
the share of each foreign set caught (ideally 1). The last line is the committed params' row.

    python bench/guard.py [--model models/finetuned.pt] [--data-dir data/digits]
        [--prepared data/prepared] [--neighbours 1,5,10,50] [--rates 0.005,0.01,0.02,0.05]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import ImageOps

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: a table, not bars

from headstart.familiarity import (
    FOREIGN,
    LogitsAndFeatures,
    build_guard,
    foreign_images,
    reference_sample,
    split_outputs,
)
from headstart.images import load_rgb
from headstart.index import load_prepared
from headstart.model import load_classifier
from headstart.params import load_params
from headstart.transforms import eval_transform, preprocessing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/finetuned.pt"))
    parser.add_argument("--data-dir", type=Path, default=None, help="default: params data.dir")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--neighbours", default="1,5,10,50")
    parser.add_argument("--rates", default="0.005,0.01,0.02,0.05")
    args = parser.parse_args()
    params = load_params()
    prepared = load_prepared(args.data_dir or Path(params.data.dir), args.prepared)
    model, meta = load_classifier(args.model)
    transform = eval_transform(**preprocessing(meta))
    scored = LogitsAndFeatures(model).eval()

    def features_of(images) -> np.ndarray:
        batches = [images[i : i + 64] for i in range(0, len(images), 64)]
        with torch.inference_mode():
            outputs = [scored(torch.stack([transform(im) for im in batch])) for batch in batches]
        return split_outputs(torch.cat(outputs).numpy(), len(meta["classes"]))[1]

    start = time.perf_counter()
    splits = {}
    for name in ("train", "val", "test"):
        images = prepared.split(name)
        if name == "train":
            keep = reference_sample(len(images.paths), params.evaluate.guard_reference)
            images = images.subset(keep)
        splits[name] = [load_rgb(prepared.root / p) for p in images.paths]
    features = {name: features_of(images) for name, images in splits.items()}
    size = int(meta["image_size"])
    foreign = {name: features_of(foreign_images(name, size)) for name in FOREIGN}
    foreign["inverted"] = features_of([ImageOps.invert(im) for im in splits["test"]])
    foreign["rotated"] = features_of([im.rotate(90, expand=True) for im in splits["test"]])
    print(
        f"{args.model} ({meta['backbone']}, {size} px): {len(features['train'])} train, "
        f"{len(features['val'])} val, {len(features['test'])} test images; "
        f"features in {time.perf_counter() - start:.0f} s"
    )

    header = ["k", "rate", "test flagged", *(f"{name} caught" for name in foreign)]
    print(" | ".join(header))
    for k in [int(v) for v in args.neighbours.split(",")]:
        for rate in [float(v) for v in args.rates.split(",")]:
            guard = build_guard(features["train"], features["val"], k, rate)
            flagged = (~guard.familiar(guard.scores(features["test"]))).mean()
            caught = [(~guard.familiar(guard.scores(f))).mean() for f in foreign.values()]
            print(
                " | ".join([str(k), f"{rate:g}", f"{flagged:.3f}", *(f"{c:.3f}" for c in caught)])
            )
    committed = (params.evaluate.guard_neighbours, params.evaluate.guard_flag_rate)
    guard = build_guard(features["train"], features["val"], *committed)
    flagged = (~guard.familiar(guard.scores(features["test"]))).mean()
    caught = {n: (~guard.familiar(guard.scores(f))).mean() for n, f in foreign.items()}
    print(
        f"committed (k {committed[0]}, rate {committed[1]:g}): test flagged {flagged:.3f}; "
        + ", ".join(f"{n} caught {c:.3f}" for n, c in caught.items())
    )


if __name__ == "__main__":
    main()
