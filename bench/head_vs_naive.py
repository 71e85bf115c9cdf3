"""Cached features versus the usual loop, side by side in one process.

The usual recipe (most tutorials) trains a new head by running the frozen backbone over every
image in every epoch. headstart runs the backbone once (extract), then trains the head on the
cached features. Same data, backbone, input size, head, optimiser, seed and epochs on both
sides; the cached side includes its extraction. Prints both wall times, both test accuracies,
and the ratios; the last line is the full-pipeline ratio.

Then what a head-only experiment costs through DVC, the way users run it: in a throw-away git +
DVC copy of this project (same params.yaml), `dvc repro train_head` once, then the timed
`dvc exp run -S head.lr=... train_head` (features reused; DVC's and Python's start-up
included), twice: with the committed head params (up to head.epochs, early stopping), and with
the epochs both sides above train (`-S head.epochs=25 -S head.patience=25`), like for like.

    python bench/head_vs_naive.py                      # built-in digits, 25 epochs
    python bench/head_vs_naive.py --photos 4000        # 4,000 generated 400x300 JPEGs
    python bench/head_vs_naive.py --data data/raw --prepared data/prepared --epochs 25 --no-dvc

With --data, needs a prepared index of it (run `dvc repro prepare` first); the DVC part then
runs on the built-in digits. With --photos, everything (both sides and the DVC part) runs on
the generated photos in the throw-away repository. The DVC part costs a fixed few seconds
(DVC, Python and torch start-up) while the usual loop grows with images x epochs, so its ratio
grows with the dataset: --photos measures it at a size of your choice.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from project import make_repo, sh, stage_costs
from torch import nn
from torch.utils.data import DataLoader

from headstart.backbones import backbone_spec, build_backbone
from headstart.extraction import extract_features
from headstart.heads import read_features, train_head
from headstart.index import Images, load_prepared
from headstart.inference import run_inference
from headstart.io import read_array
from headstart.loaders import image_loader
from headstart.model import Classifier, set_trainable, train_mode
from headstart.params import load_params
from headstart.runtime import precision_name, resolve_precision, seed_everything, set_threads
from headstart.train import fit
from headstart.transforms import eval_transform, resolve_image_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/digits"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument(
        "--photos",
        type=int,
        help="run on this many generated photos in a throw-away git + DVC repository",
    )
    parser.add_argument(
        "--no-dvc", action="store_true", help="skip the head-only `dvc exp run` measurement"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    repo = None
    if args.photos:
        root = Path(tempfile.mkdtemp(prefix="headstart-head-vs-naive-"))
        repo = make_repo(root, {"data.dir": "data/photos"}, photos=args.photos)
        sh(repo, "dvc", "repro", "prepare")
        args.data, args.prepared = repo / "data" / "photos", repo / "data" / "prepared"
    params = load_params()
    prepared = load_prepared(args.data, args.prepared)
    spec = backbone_spec(params.backbone.name)
    size = resolve_image_size(params.backbone.image_size, spec, prepared.report)
    transform = eval_transform(size, spec.mean, spec.std, spec.interpolation, spec.crop_pct)
    set_threads(params.compute.threads)
    device = torch.device("cpu")
    compute = dataclasses.replace(params.compute, device="cpu", nproc=1)  # both sides: CPU
    # Extraction at compute.precision, as the extract stage runs it, and the head trained in
    # float32, as train_head does; the usual loop runs at compute.precision throughout (its
    # frozen backbone is the bulk of its work).
    precision = resolve_precision(params.compute.precision, device)
    head = params.head
    fit_options = {
        "epochs": args.epochs,
        "patience": args.epochs,  # no early stop: both sides run every epoch
        "label_smoothing": head.label_smoothing,
        "device": device,
    }

    def images(which: Images) -> DataLoader:
        return image_loader(
            args.data,
            which,
            transform,
            decode_size=size,
            batch_size=params.inference.batch_size,
            num_workers=params.compute.num_workers,
        )

    def new_head(width: int) -> nn.Linear:
        seed_everything(head.seed)
        return nn.Linear(width, len(prepared.classes))

    backbone = build_backbone(params.backbone.name, params.backbone.weights)
    print(
        f"{len(prepared.images)} images, {params.backbone.name} at {size} px, "
        f"{args.epochs} epochs, {torch.get_num_threads()} threads, {precision_name(precision)}"
    )

    # Cached: what the pipeline does, through the stages' own functions: extract once into a
    # scratch folder, then train the head on the feature files.
    scratch = Path(tempfile.mkdtemp(prefix="headstart-head-vs-naive-features-")) / "features"
    start = time.perf_counter()
    extract_features(prepared, params.backbone, compute, params.inference, scratch)
    extract_s = time.perf_counter() - start
    start = time.perf_counter()
    linear, _ = train_head(
        read_features(scratch),
        dataclasses.replace(head, kind="linear", epochs=args.epochs, patience=args.epochs),
    )
    head_s = time.perf_counter() - start
    with torch.inference_mode():
        test_x = read_array(scratch / "test_features.npy")
        test_y = read_array(scratch / "test_labels.npy")
        cached_accuracy = float(
            (linear(torch.from_numpy(test_x)).argmax(1).numpy() == test_y).mean()
        )

    # Usual loop: the frozen backbone runs on every image in every epoch.
    start = time.perf_counter()
    model = Classifier(backbone, len(prepared.classes))
    model.head = new_head(backbone.num_features)
    frozen = set_trainable(model, 0)
    groups = [
        {"params": list(model.head.parameters()), "lr": head.lr, "weight_decay": head.weight_decay}
    ]
    train = image_loader(
        args.data,
        prepared.split("train"),
        transform,
        decode_size=size,
        batch_size=head.batch_size,
        num_workers=params.compute.num_workers,
        shuffle=True,
        generator=torch.Generator().manual_seed(head.seed),
    )
    fit(
        model,
        train,
        images(prepared.split("val")),
        groups,
        train_mode=lambda m: train_mode(m, frozen, "frozen"),
        desc="usual loop",
        precision=precision,
        **fit_options,
    )
    logits, labels = run_inference(
        model, images(prepared.split("test")), device, desc="usual test", precision=precision
    )
    naive_s = time.perf_counter() - start
    naive_accuracy = float((logits.argmax(1) == labels).mean())

    cached_s = extract_s + head_s
    print(
        f"cached: extract {extract_s:.1f} s + head {head_s:.1f} s = {cached_s:.1f} s, "
        f"test accuracy {cached_accuracy:.4f}"
    )
    print(f"usual loop: {naive_s:.1f} s, test accuracy {naive_accuracy:.4f}")
    print(f"accuracy_difference={cached_accuracy - naive_accuracy:+.4f}")
    print(f"head_only_ratio={naive_s / head_s:.1f}  (the head's training alone)")
    if not args.no_dvc:
        runs = head_experiment_seconds(head.lr, args.epochs, repo)
        for (label, exp_s, stage_s), key in zip(runs, ("committed", "same_epochs"), strict=True):
            print(
                f"dvc exp run -S head.lr=... train_head, {label}: {exp_s:.1f} s, of which "
                f"train_head's own work {stage_s:.1f} s (the rest: DVC, Python and torch start-up)"
            )
            print(f"head_only_dvc_ratio_{key}={naive_s / exp_s:.1f}")
    print(f"ratio={naive_s / cached_s:.1f}")


def head_experiment_seconds(
    lr: float, epochs: int, repo: Path | None
) -> list[tuple[str, float, float]]:
    """A head-only experiment through DVC after a first `dvc repro train_head`, in `repo` or
    else in a new repository of the built-in digits, twice: `dvc exp run -S head.lr=<another
    lr> train_head` with the committed head params (up to head.epochs, early stopping), and the
    same with `epochs` and no early stop, as both sides above train. [(what, wall seconds,
    train_head's own seconds)] for the two."""
    if repo is None:
        repo = make_repo(Path(tempfile.mkdtemp(prefix="headstart-head-exp-")), {})
    sh(repo, "dvc", "repro", "train_head")
    variants = [
        ("committed head params", []),
        (
            f"{epochs} epochs, no early stop",
            ["-S", f"head.epochs={epochs}", "-S", f"head.patience={epochs}"],
        ),
    ]
    results = []
    for number, (label, extra) in enumerate(variants, start=2):
        start = time.perf_counter()
        output = sh(
            repo, "dvc", "exp", "run", "-S", f"head.lr={lr * number:g}", *extra, "train_head"
        )
        seconds = time.perf_counter() - start
        costs = stage_costs(output)
        assert set(costs) == {"train_head"}, f"expected only train_head to run:\n{output}"
        results.append((label, seconds, costs["train_head"][0]))
    return results


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
