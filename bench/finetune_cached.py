"""Top-block fine-tuning from cached activations versus the whole backbone every epoch.

Without pixel-level augmentation (`finetune.augment: none`) the frozen lower blocks compute the
same activations every epoch; the finetune stage then caches them once at the cut and trains
only the top `finetune.unfreeze` blocks. Both sides here start from the same weights and see the
same batches in the same order (one seeded generator), with the finetune params from params.yaml
and augment none; the cached side includes computing its cache. Prints seconds per epoch, total
seconds and test accuracy of each side; the last line is the per-epoch ratio.

Also prints the top blocks' share f of the forward pass's FLOPs and the ratio that share allows
from compute alone: a whole-backbone epoch runs the whole forward pass (1) plus the backward
pass of the top blocks (about 2f: no gradient flows below the cut), a cached epoch only the top
blocks' forward and backward (3f), so (1 + 2f) / 3f. Decoding, which the cached side also
skips, comes on top.

    python bench/finetune_cached.py                    # built-in digits, 3 epochs
    python bench/finetune_cached.py --epochs 5 --unfreeze 2

Needs a prepared index and a trained head (`dvc repro train_head` first).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from headstart.backbones import build_backbone
from headstart.index import load_prepared
from headstart.inference import cache_activations, run_inference
from headstart.io import load_checkpoint
from headstart.loaders import image_loader, sampling
from headstart.model import Classifier, param_groups, set_trainable, split_at_cut, train_mode
from headstart.params import load_params
from headstart.runtime import precision_name, resolve_precision, seed_everything, set_threads
from headstart.train import fit
from headstart.transforms import eval_transform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/digits"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--head", type=Path, default=Path("models/head.pt"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--unfreeze", type=int, help="default: finetune.unfreeze")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    params = load_params()
    ft = params.finetune
    unfreeze = ft.unfreeze if args.unfreeze is None else args.unfreeze
    set_threads(params.compute.threads)
    device = torch.device("cpu")
    precision = resolve_precision(params.compute.precision, device, training=True)
    prepared = load_prepared(args.data, args.prepared)
    head_state, head_meta = load_checkpoint(args.head)
    size = head_meta["features_meta"]["image_size"]
    mean, std = head_meta["features_meta"]["mean"], head_meta["features_meta"]["std"]
    transform = eval_transform(size, mean, std)

    def images(split: str, **options) -> DataLoader:
        return image_loader(
            args.data,
            prepared.split(split),
            transform,
            decode_size=size,
            batch_size=ft.batch_size,
            num_workers=params.compute.num_workers,
            **options,
        )

    def fine_tune(cached: bool, scratch: Path) -> tuple[float, float, float]:
        """(seconds per epoch, total seconds, test accuracy) for one side."""
        generator = seed_everything(ft.seed)
        model = Classifier(
            build_backbone(params.backbone.name, params.backbone.weights), len(prepared.classes)
        )
        model.head.load_state_dict(head_state)
        frozen = set_trainable(model, unfreeze)
        groups = param_groups(model, ft.lr_head, ft.lr_backbone, ft.weight_decay)
        start = time.perf_counter()
        if cached:
            bottom, trainee = split_at_cut(model, unfreeze)
            activations = {
                split: cache_activations(
                    bottom,
                    images(split),
                    device,
                    scratch / f"{split}.npy",
                    split,
                    None,
                    precision,
                )
                for split in ("train", "val")
            }
            train = DataLoader(
                activations["train"],
                **sampling(activations["train"], ft.batch_size, True, generator),
            )
            val = DataLoader(
                activations["val"], **sampling(activations["val"], ft.batch_size, False, None)
            )
        else:
            trainee, train = model, images("train", shuffle=True, generator=generator)
            val = images("val")
        setup = time.perf_counter() - start
        epochs_start = time.perf_counter()
        fit(
            trainee,
            train,
            val,
            groups,
            epochs=args.epochs,
            patience=args.epochs,  # no early stop: both sides run every epoch
            label_smoothing=ft.label_smoothing,
            device=device,
            train_mode=lambda _: train_mode(model, frozen, ft.bn),
            desc="cached" if cached else "whole backbone",
            precision=precision,
        )
        per_epoch = (time.perf_counter() - epochs_start) / args.epochs
        logits, labels = run_inference(model, images("test"), device, desc="test")
        return (
            per_epoch,
            setup + per_epoch * args.epochs,
            float((logits.argmax(1) == labels).mean()),
        )

    share = top_flops_share(params.backbone.name, len(prepared.classes), unfreeze, size)
    print(
        f"{len(prepared.images)} images, {params.backbone.name} at {size} px, "
        f"top {unfreeze} blocks, "
        f"{args.epochs} epochs, batch {ft.batch_size}, {torch.get_num_threads()} threads, "
        f"{precision_name(precision)}"
    )
    with tempfile.TemporaryDirectory(prefix="headstart-bench-") as scratch:
        full = fine_tune(cached=False, scratch=Path(scratch))
        cached = fine_tune(cached=True, scratch=Path(scratch))
    for name, (per_epoch, total, accuracy) in (("whole backbone", full), ("cached", cached)):
        print(
            f"{name}: {per_epoch:.1f} s/epoch, {total:.1f} s in all, test accuracy {accuracy:.4f}"
        )
    print(
        f"top {unfreeze} blocks: {share:.1%} of the forward FLOPs; compute alone allows "
        f"{(1 + 2 * share) / (3 * share):.1f}x per epoch"
    )
    print(f"accuracy_difference={cached[2] - full[2]:+.4f}")
    print(f"total_ratio={full[1] / cached[1]:.1f}")
    print(f"ratio={full[0] / cached[0]:.1f}")


def top_flops_share(backbone: str, num_classes: int, unfreeze: int, size: int) -> float:
    """The top `unfreeze` blocks' (with neck and head) share of one image's forward FLOPs."""
    model = Classifier(build_backbone(backbone, "none"), num_classes).eval()
    bottom, top = split_at_cut(model, unfreeze)
    image = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        with FlopCounterMode(display=False) as whole:
            model(image)
        cut = bottom(image)
        with FlopCounterMode(display=False) as upper:
            top(cut)
    return upper.get_total_flops() / whole.get_total_flops()


if __name__ == "__main__":
    main()
