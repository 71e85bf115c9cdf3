"""Generated photo-like ImageFolders for the benchmarks: any number of images, no download.

Each image is a smooth random colour field (a few control points upsampled bicubically) with
fine grain, saved as JPEG like most photo collections; each class has its own colour cast and
blob layout, so a backbone's features can tell the classes apart. Seeded: the same arguments
give the same bytes.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (400, 300)  # width, height: larger than 224 on both sides, as photos are


def _write_one(task: tuple[Path, int, int, int, tuple[int, int]]) -> None:
    path, class_index, num_classes, seed, size = task
    rng = np.random.default_rng(seed)
    width, height = size
    layout = np.random.default_rng(class_index).random((4, 3, 3))  # the class's blob layout
    control = 0.6 * layout + 0.4 * rng.random((4, 3, 3))
    hue = np.array([class_index, num_classes - class_index, num_classes / 2]) / num_classes
    control = np.clip(0.7 * control + 0.3 * hue, 0, 1)
    field = Image.fromarray((control * 255).astype(np.uint8)).resize(size, Image.BICUBIC)
    grain = rng.normal(0, 12, (height, width, 3))
    pixels = np.clip(np.asarray(field, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_photos(
    root: Path,
    count: int,
    classes: int = 10,
    size: tuple[int, int] = SIZE,
    seed: int = 0,
    workers: int = 2,
) -> Path:
    """Write `count` JPEGs into root/class_XX/img_XXXXXX.jpg (skipped if already complete)."""
    tasks = []
    for index in range(count):
        label = index % classes
        folder = root / f"class_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{index:06d}.jpg"
        if not path.exists():
            tasks.append((path, label, classes, seed * 10_000_019 + index, size))
    if tasks:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_one, tasks, chunksize=64))
    return root
