"""Top-block fine-tuning from cached activations versus the whole backbone every epoch.

Without pixel-level augmentation (`finetune.augment: none`) the frozen lower blocks compute the
same activations every epoch; the finetune stage then caches them once at the cut and trains
only the top `finetune.unfreeze` blocks. Both sides here run the finetune stage's own function
(headstart.finetuning.finetune), forced to one path or the other, with the finetune params from
params.yaml and augment none: the same weights, the same batches in the same order. The cached
side's total includes computing its cache. Prints seconds per epoch, total seconds and test
accuracy of each side; the last line is the per-epoch ratio.

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
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from headstart.backbones import build_backbone
from headstart.checkpoints import load_checkpoint
from headstart.finetuning import finetune
from headstart.index import load_prepared
from headstart.inference import run_inference
from headstart.loaders import image_loader
from headstart.model import Classifier, split_at_cut
from headstart.params import load_params
from headstart.runtime import precision_name, resolve_precision
from headstart.transforms import decode_size, eval_transform, preprocessing


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
    unfreeze = params.finetune.unfreeze if args.unfreeze is None else args.unfreeze
    # The finetune stage's own function, on the CPU, without augmentation and without early
    # stopping (both sides run every epoch); only `cache` differs between the two sides.
    compute = dataclasses.replace(params.compute, device="cpu", nproc=1)
    ft = dataclasses.replace(
        params.finetune,
        augment="none",
        unfreeze=unfreeze,
        epochs=args.epochs,
        patience=args.epochs,
    )
    prepared = load_prepared(args.data, args.prepared)
    head_state, head_meta = load_checkpoint(args.head)
    features_meta = head_meta["features_meta"]
    size = features_meta["image_size"]

    def fine_tune(cache: bool, scratch: Path) -> tuple[float, float, float]:
        """(seconds per epoch, total seconds, test accuracy) for one side."""
        start = time.perf_counter()
        result = finetune(
            prepared,
            head_state,
            head_meta,
            params.backbone,
            compute,
            ft,
            scratch_dir=scratch,
            cache=cache,
        )
        total = time.perf_counter() - start
        test = image_loader(
            args.data,
            prepared.split("test"),
            eval_transform(**preprocessing(features_meta)),
            decode_size=decode_size(features_meta),
            batch_size=params.inference.batch_size,
            num_workers=compute.num_workers,
        )
        logits, labels = run_inference(result.model, test, torch.device("cpu"), desc="test")
        per_epoch = sum(result.fit.epoch_seconds) / len(result.fit.epoch_seconds)
        return per_epoch, total, float((logits.argmax(1) == labels).mean())

    share = top_flops_share(params.backbone.name, len(prepared.classes), unfreeze, size)
    precision = resolve_precision(compute.precision, torch.device("cpu"), training=True)
    print(
        f"{len(prepared.images)} images, {params.backbone.name} at {size} px, "
        f"top {unfreeze} blocks, {args.epochs} epochs, batch {ft.batch_size}, "
        f"{torch.get_num_threads()} threads, {precision_name(precision)}"
    )
    with tempfile.TemporaryDirectory(prefix="headstart-bench-") as scratch:
        full = fine_tune(cache=False, scratch=Path(scratch))
        cached = fine_tune(cache=True, scratch=Path(scratch))
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
