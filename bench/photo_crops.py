"""A small real-photo ImageFolder for the benchmarks, offline: crops of the colour photos that
ship inside scikit-image (an astronaut, a cat, coffee, a rocket launch, a retina, the Hubble
deep field, a tissue stain), one class per photo.

Train crops come from the left 60% of each photo, validation and test crops from the right
40%, so the held-out images show parts of the scene the training images never saw: the task
is to recognise the photo from an unseen region, where crops, flips and colour changes can
help or hurt. Each crop is a random square of 20-45% of the photo's short side, resized to
`size` px and saved as JPEG. Seeded: the same arguments give the same bytes.

    python bench/photo_crops.py OUT [--train 30 --val 10 --test 20 --size 64]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "retina",
    "hubble_deep_field",
    "immunohistochemistry",
)
TRAIN_SHARE = 0.6  # of the width: train crops left of it, val and test crops right of it


def _crop(photo: np.ndarray, rng: np.random.Generator, left: int, right: int, size: int):
    height = photo.shape[0]
    side = int(rng.uniform(0.20, 0.45) * min(height, photo.shape[1]))
    side = min(side, right - left, height)
    x = int(rng.integers(left, right - side + 1))
    y = int(rng.integers(0, height - side + 1))
    patch = Image.fromarray(photo[y : y + side, x : x + side])
    return patch.resize((size, size), Image.BICUBIC)


def make_photo_crops(
    root: Path, train: int = 30, val: int = 10, test: int = 20, size: int = 64, seed: int = 0
) -> Path:
    """Write `root`/<train|val|test>/<photo>/<n>.jpg; returns `root`."""
    import skimage.data

    counts = {"train": train, "val": val, "test": test}
    for index, name in enumerate(PHOTOS):
        photo = getattr(skimage.data, name)()[..., :3]
        width = photo.shape[1]
        cut = int(TRAIN_SHARE * width)
        rng = np.random.default_rng([seed, index])
        for split, count in counts.items():
            left, right = (0, cut) if split == "train" else (cut, width)
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                _crop(photo, rng, left, right, size).save(folder / f"{n:03d}.jpg", quality=90)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=30)
    parser.add_argument("--val", type=int, default=10)
    parser.add_argument("--test", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_photo_crops(args.out, args.train, args.val, args.test, args.size, args.seed)
    print(f"{args.out}: {len(PHOTOS)} classes, {args.train}/{args.val}/{args.test} per class")


if __name__ == "__main__":
    main()
