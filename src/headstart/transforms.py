"""Transforms from a PIL image to a normalised tensor, and the input size.

Augmentation policies live in one table, AUGMENTATIONS: `finetune.augment` is validated
against it, and adding a policy is adding an entry (and its test). Every random draw comes
from torch's global generator, which the loader seeds per image and epoch (loaders.SeededOrder),
so an image's augmentation does not depend on the worker or process that makes it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torchvision import transforms
from torchvision.transforms import v2

log = logging.getLogger(__name__)


# What every model's and features' metadata says of its preprocessing beyond size, mean and
# std; files written before these keys existed used these values.
DEFAULT_INTERPOLATION = "bicubic"
DEFAULT_CROP_PCT = 1.0


def resize_size(size: int, crop_pct: float = DEFAULT_CROP_PCT) -> int:
    """The short side before the centre crop: `size` / crop_pct, rounded down as timm does."""
    return size if crop_pct == 1.0 else math.floor(size / crop_pct)


def eval_transform(
    size: int,
    mean,
    std,
    interpolation: str = DEFAULT_INTERPOLATION,
    crop_pct: float = DEFAULT_CROP_PCT,
) -> transforms.Compose:
    """Resize the short side to size / crop_pct, centre-crop a `size` square, normalise. No
    randomness. crop_pct 1.0 keeps the whole short side; timm's weights carry their own (such
    as 0.875, which trims the borders as their ImageNet evaluation did)."""
    return transforms.Compose(
        [
            transforms.Resize(
                resize_size(size, crop_pct),
                interpolation=transforms.InterpolationMode(interpolation),
                antialias=True,
            ),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def _light(size: int) -> list[Callable]:
    """Small shifts, rotations and scaling; no flips (they change the meaning of digits, text
    and many other classes). After normalising, fill=0 pads uncovered corners with the mean
    colour."""
    return [
        transforms.RandomAffine(
            degrees=10,
            translate=(0.08, 0.08),
            scale=(0.9, 1.1),
            interpolation=transforms.InterpolationMode.BILINEAR,
            fill=0.0,
        )
    ]


def _appended(random_steps: Callable[[int], list[Callable]]) -> Callable[..., Callable]:
    """A policy that runs the eval transform, then `random_steps(size)` on the tensor."""

    def build(**steps) -> transforms.Compose:
        fixed = list(eval_transform(**steps).transforms)
        return transforms.Compose(fixed + random_steps(steps["size"]))

    return build


def _photo(strong: bool) -> Callable[..., Callable]:
    """For natural images, where a mirror image is the same class: a random-resized crop (a
    quarter to all of the image, aspect 3:4 to 4:3) in place of the centre crop, a horizontal
    flip, mild colour jitter; `strong` adds TrivialAugmentWide and random erasing (a quarter
    of the images, filled with the mean colour). Photometric steps run on the pixels, before
    normalising."""

    def build(size, mean, std, interpolation=DEFAULT_INTERPOLATION, crop_pct=DEFAULT_CROP_PCT):
        mode = v2.InterpolationMode(interpolation)
        steps = [
            v2.RandomResizedCrop(size, scale=(0.25, 1.0), interpolation=mode, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        ]
        if strong:
            steps.append(v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR))
        steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        if strong:
            steps.append(v2.RandomErasing(p=0.25, value=0.0))
        return v2.Compose(steps)

    return build


# finetune.augment: policy name -> the training transform, given eval_transform's arguments.
# `none` is the eval transform itself, so training then sees exactly what evaluation sees.
AUGMENTATIONS: dict[str, Callable[..., Callable]] = {
    "none": _appended(lambda size: []),
    "light": _appended(_light),
    "photo": _photo(strong=False),
    "strong": _photo(strong=True),
}


def preprocessing(meta: dict) -> dict[str, Any]:
    """eval_transform's arguments as a model's or features' metadata records them."""
    return {
        "size": meta["image_size"],
        "mean": meta["mean"],
        "std": meta["std"],
        "interpolation": meta.get("interpolation", DEFAULT_INTERPOLATION),
        "crop_pct": meta.get("crop_pct", DEFAULT_CROP_PCT),
    }


def decode_size(meta: dict) -> int:
    """The smallest short side an image may be decoded at (JPEG draft) before the resize."""
    steps = preprocessing(meta)
    return resize_size(steps["size"], steps["crop_pct"])


def train_transform(augment: str, **steps) -> Callable:
    """The training transform of the `augment` policy; `steps`: eval_transform's arguments, as
    `preprocessing` gives them."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; known: {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[augment](**steps)


def batch_mix(mixup: float, cutmix: float, num_classes: int) -> Callable | None:
    """finetune.mixup and finetune.cutmix as one callable (images, labels) -> (mixed images,
    soft labels (B, num_classes)): torchvision's MixUp or CutMix, or a random choice of the
    two per batch; None when both are off. Each pairs an image with its neighbour in the batch
    (torchvision's roll), so under torchrun each process mixes within its share."""
    mixes = []
    if mixup > 0:
        mixes.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        mixes.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def choose_image_size(median_side: float, default_size: int) -> int:
    """Input size for `backbone.image_size: auto`: 4x the median short side, rounded up to a
    multiple of 32, at least 96 and at most the size the backbone was trained at.

    Why: ImageNet backbones downsample 32x, so below 96 px their last feature map is 2x2 or
    smaller and small images lose detail; upscaling small images helps until about 4x, and
    costs more with every step (docs/data.md). Photos and drawings of 56 px or more get the
    backbone's full training size.
    """
    wanted = int(np.ceil(4 * median_side / 32.0) * 32)
    return int(min(max(wanted, 96), default_size))


def resolve_image_size(image_size: int | str, spec, report: dict) -> int:
    """backbone.image_size as pixels: the number itself, or `auto`: the backbone's own size
    when it takes only that one (most ViTs), else from the data report."""
    if image_size != "auto":
        return int(image_size)
    if spec.fixed_size:
        log.info("backbone.image_size auto: %s takes %d px only", spec.name, spec.default_size)
        return spec.default_size
    size = choose_image_size(report["image_short_side"]["median"], spec.default_size)
    log.info(
        "backbone.image_size auto: median short side %.0f px -> %d px",
        report["image_short_side"]["median"],
        size,
    )
    return size


def split_normalization(transform) -> tuple[Any, transforms.Normalize | None]:
    """(what the loader workers run per image, the Normalize to run on whole batches or None).

    A transform that ends in ToTensor + Normalize (eval_transform, and train_transform without
    augmentation) stops at uint8 pixels in the workers (PILToTensor): a quarter of the bytes to
    send between processes and less work per image. The loader then converts and normalises
    each batch in one go, with the same float operations in the same order, so the result is
    bit for bit what the per-image transform gives. Other transforms run whole in the workers.
    """
    steps = getattr(transform, "transforms", None)
    if (
        not steps
        or len(steps) < 2
        or not isinstance(steps[-2], transforms.ToTensor)
        or not isinstance(steps[-1], transforms.Normalize)
    ):
        return transform, None
    return transforms.Compose([*steps[:-2], transforms.PILToTensor()]), steps[-1]
