"""Transforms from a PIL image to a normalised tensor, and the input size.

Augmentation policies live in one table, AUGMENTATIONS: `finetune.augment` is validated
against it, and adding a policy is adding an entry (and its test).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from torchvision import transforms

log = logging.getLogger(__name__)


def eval_transform(size: int, mean, std) -> transforms.Compose:
    """Resize the short side to `size`, centre-crop a square, normalise. No randomness."""
    return transforms.Compose(
        [
            transforms.Resize(
                size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True
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


# finetune.augment: policy name -> the random steps (given the input size) appended to the
# eval transform. `none` adds nothing, so training then sees exactly what evaluation sees.
AUGMENTATIONS: dict[str, Callable[[int], list[Callable]]] = {
    "none": lambda size: [],
    "light": _light,
}


def train_transform(size: int, mean, std, augment: str) -> transforms.Compose:
    """The eval transform followed by the random steps of the `augment` policy."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; known: {', '.join(AUGMENTATIONS)}")
    steps = list(eval_transform(size, mean, std).transforms) + AUGMENTATIONS[augment](size)
    return transforms.Compose(steps)


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
    """backbone.image_size as pixels: the number itself, or `auto` from the data report."""
    if image_size != "auto":
        return int(image_size)
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
