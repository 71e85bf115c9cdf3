"""The built-in dataset: scikit-learn's handwritten digits, written out as an ImageFolder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out_dir: Path) -> int:
    """Write scikit-learn's 1,797 8x8 handwritten digits as `<out_dir>/<digit>/<n>.png`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16 ink; scale to 0..255 and invert to dark ink on white paper.
    pixels = 255 - np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for index, (image, target) in enumerate(zip(pixels, digits.target, strict=True)):
        class_dir = out_dir / str(int(target))
        class_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(class_dir / f"{index:04d}.png", optimize=False)
    return len(pixels)
