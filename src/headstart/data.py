"""Image folders: the built-in dataset, indexing, splitting, decoding, transforms.

An ImageFolder is `<root>/<class>/<image>`; images in sub-folders of a class folder belong to
that class. Splits come from file content (sha256) and the seed, never from listing order, so
identical bytes always land in the same split and adding images does not move existing ones
(except in classes so small that an image had to be moved to give them a val or test image).
"""

from __future__ import annotations

import hashlib
import logging
import os
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
# Never classes, never samples: OS and tool droppings.
IGNORED_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", "__MACOSX"})
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the data root, POSIX separators
    label: str
    sha256: str
    width: int
    height: int


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def _walk_files(class_dir: Path) -> list[Path]:
    """All non-hidden files below class_dir, sorted, following directory symlinks once."""
    found: list[Path] = []
    seen_dirs: set[str] = set()
    stack = [class_dir]
    while stack:
        directory = stack.pop()
        real = os.path.realpath(directory)
        if real in seen_dirs:
            continue
        seen_dirs.add(real)
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if _is_hidden(entry.name):
                continue
            path = Path(entry.path)
            if entry.is_dir():
                stack.append(path)
            else:
                found.append(path)
    return sorted(found)


def inspect_image(path: Path) -> tuple[int, int]:
    """Fully decode an image to prove it is usable; return (width, height) after EXIF rotation."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.load()  # verify() misses truncated files; load() does not
            image = ImageOps.exif_transpose(image)
            return image.size


def index_image_folder(root: Path) -> tuple[list[str], list[Sample], list[Skipped]]:
    """List classes and decodable images under root; everything else is skipped with a reason."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root}: data.dir does not exist or is not a directory; point data.dir in "
            "params.yaml at an ImageFolder (<root>/<class>/<image>)"
        )
    classes: list[str] = []
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    real_root = Path(os.path.realpath(root))
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if _is_hidden(entry.name):
            continue
        if not entry.is_dir():
            skipped.append(Skipped(entry.name, "file in the root, outside any class folder"))
            continue
        label = unicodedata.normalize("NFC", entry.name)
        classes.append(label)
        for path in _walk_files(Path(entry.path)):
            relative = path.relative_to(root).as_posix()
            if not Path(os.path.realpath(path)).is_relative_to(real_root):
                skipped.append(Skipped(relative, "symbolic link to a file outside data.dir"))
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append(
                    Skipped(relative, f"not an image extension ({path.suffix or 'none'})")
                )
                continue
            try:
                width, height = inspect_image(path)
            except (
                OSError,
                ValueError,
                SyntaxError,
                Image.DecompressionBombError,
                Image.DecompressionBombWarning,
            ) as error:
                skipped.append(Skipped(relative, f"unreadable image: {error}"))
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            samples.append(Sample(relative, label, digest, width, height))
    _check_classes(root, classes)
    return classes, samples, skipped


def _check_classes(root: Path, classes: list[str]) -> None:
    folded = Counter(c.casefold() for c in classes)
    clashes = sorted(c for c in classes if folded[c.casefold()] > 1)
    if clashes:
        raise ValueError(
            f"{root}: class folders {clashes} differ only by case or Unicode form; "
            "rename them so every class name is unique ignoring case"
        )
    if len(classes) < 2:
        raise ValueError(
            f"{root}: expected one sub-folder per class, found {len(classes)} "
            f"({', '.join(classes) or 'none'}); a classifier needs at least two classes"
        )


def _unit_hash(sha256: str, seed: int) -> float:
    """A number in [0, 1) fixed by the file's content and the seed."""
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(
    samples: list[Sample], val_fraction: float, test_fraction: float, seed: int
) -> tuple[dict[str, str], list[Skipped]]:
    """Map each kept sample path to train/val/test; identical bytes share a split.

    A sample's split is fixed by where its content hash falls: [0, test) is test,
    [test, test + val) is val, the rest train. That is stratified in expectation, stable when
    images are added, and independent of listing order. A class too small to receive a val or
    test image by chance gets the lowest-hash train images moved there, so every split of every
    class is non-empty.
    """
    labels_by_hash: dict[str, set[str]] = {}
    for sample in samples:
        labels_by_hash.setdefault(sample.sha256, set()).add(sample.label)
    conflicts = {h for h, labels in labels_by_hash.items() if len(labels) > 1}
    skipped = [
        Skipped(s.path, f"same bytes appear under classes {sorted(labels_by_hash[s.sha256])}")
        for s in samples
        if s.sha256 in conflicts
    ]
    split: dict[str, str] = {}
    by_class: dict[str, list[Sample]] = {}
    for sample in samples:
        if sample.sha256 not in conflicts:
            by_class.setdefault(sample.label, []).append(sample)
    for label, members in sorted(by_class.items()):
        # Group identical bytes so duplicates move together; order groups by their hash value.
        groups: dict[str, list[Sample]] = {}
        for sample in members:
            groups.setdefault(sample.sha256, []).append(sample)
        ordered = sorted(groups, key=lambda h: (_unit_hash(h, seed), h))
        assigned = {}
        for digest in ordered:
            u = _unit_hash(digest, seed)
            assigned[digest] = (
                "test"
                if u < test_fraction
                else ("val" if u < test_fraction + val_fraction else "train")
            )
        for name in ("test", "val"):
            if name not in assigned.values():
                spare = [d for d in ordered if assigned[d] == "train"]
                if len(spare) < 2:
                    raise ValueError(
                        f"class {label!r} has {len(members)} distinct image(s): too few to give "
                        f"train, val and test at least one each; add images to {label!r} or "
                        "remove the class folder"
                    )
                assigned[spare[0]] = name
        for digest, name in assigned.items():
            for sample in groups[digest]:
                split[sample.path] = name
    return split, skipped


# --------------------------------------------------------------------------------------------
# Decoding and transforms


def load_rgb(path: Path) -> Image.Image:
    """Decode an image file to RGB, with EXIF orientation applied."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            # Composite transparency on white instead of exposing hidden colours.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


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


def train_transform(size: int, mean, std, augment: str) -> transforms.Compose:
    """`none` is the eval transform; `light` adds small shifts, rotations and scaling (no
    flips: they change the meaning of digits, text and many other classes)."""
    steps = list(eval_transform(size, mean, std).transforms)
    if augment == "light":
        # After normalising, fill=0 pads uncovered corners with the mean colour.
        steps.append(
            transforms.RandomAffine(
                degrees=10,
                translate=(0.08, 0.08),
                scale=(0.9, 1.1),
                interpolation=transforms.InterpolationMode.BILINEAR,
                fill=0.0,
            )
        )
    return transforms.Compose(steps)


class ImageDataset(Dataset):
    """(image tensor, label index) for paths relative to root; errors name the file."""

    def __init__(self, root: Path, paths: list[str], labels: list[int], transform):
        self.root = root
        self.paths = paths
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.root / self.paths[index]
        try:
            image = load_rgb(path)
        except Exception as error:  # re-raised with the file named, never swallowed
            raise RuntimeError(f"{path}: cannot decode image: {error}") from error
        return self.transform(image), self.labels[index]


def choose_image_size(median_side: float, default_size: int) -> int:
    """Input size for `backbone.image_size: auto`: 4x the median short side, rounded up to a
    multiple of 32, at least 96 and at most the size the backbone was trained at.

    Why: ImageNet backbones downsample 32x, so below 96 px their last feature map is 2x2 or
    smaller and small images lose detail (the 8x8 digits: linear-probe test accuracy 0.91 at
    64 px, 0.94 at 96, 0.95 at 128 for 5x the cost of 64). Upscaling small images helps until
    about 4x; photos and drawings of 56 px or more get the backbone's full training size.
    """
    wanted = int(np.ceil(4 * median_side / 32.0) * 32)
    return int(min(max(wanted, 96), default_size))


def image_loader(
    root: Path,
    rows: list[dict[str, str]],
    class_to_index: dict[str, int],
    transform,
    *,
    batch_size: int,
    num_workers: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> torch.utils.data.DataLoader:
    """Batches of (images (B, 3, S, S), labels (B,)) for index rows; workers seeded and ordered."""
    dataset = ImageDataset(
        root, [r["path"] for r in rows], [class_to_index[r["label"]] for r in rows], transform
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        worker_init_fn=_seed_worker,
        persistent_workers=num_workers > 0,
    )


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow it.
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


@dataclass(frozen=True)
class PreparedData:
    """What prepare wrote: the class list, the index rows and the data report."""

    root: Path
    classes: list[str]
    rows: list[dict[str, str]]
    report: dict

    def split(self, name: str) -> list[dict[str, str]]:
        return [r for r in self.rows if r["split"] == name]

    @property
    def class_to_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}


def load_prepared(data_root: Path, prepared_dir: Path) -> PreparedData:
    from headstart.io import read_csv, read_json

    classes = read_json(prepared_dir / "classes.json")
    rows = read_csv(prepared_dir / "index.csv")
    report = read_json(prepared_dir / "report.json")
    unknown = sorted({r["label"] for r in rows} - set(classes))
    if unknown:
        raise ValueError(
            f"{prepared_dir}/index.csv: labels {unknown} are not in classes.json; "
            "rerun prepare (dvc repro)"
        )
    root = data_root.resolve()
    for row in rows:
        if not (root / row["path"]).resolve().is_relative_to(root):
            raise ValueError(
                f"{prepared_dir}/index.csv: path {row['path']!r} leaves {root}; "
                "rerun prepare (dvc repro)"
            )
    return PreparedData(data_root, classes, rows, report)


def prepare_index(
    root: Path, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[str], list[list[str]], dict]:
    """Index and split an ImageFolder: (classes, index rows [path, label, split, sha256,
    width, height], report with counts per class and split and every skipped file)."""
    classes, samples, skipped = index_image_folder(root)
    split, conflicts = assign_splits(samples, val_fraction, test_fraction, seed)
    skipped += conflicts
    kept = [s for s in samples if s.path in split]
    empty = [c for c in classes if not any(s.label == c for s in kept)]
    if empty:
        raise ValueError(
            f"{root}: class folder(s) {empty} contain no usable image; add images or remove "
            "the folder (see the skipped files in data/prepared/report.json)"
        )
    rows = [[s.path, s.label, split[s.path], s.sha256, str(s.width), str(s.height)] for s in kept]
    counts = {c: {name: 0 for name in SPLITS} for c in classes}
    for s in kept:
        counts[s.label][split[s.path]] += 1
    short_sides = [min(s.width, s.height) for s in kept]
    report = {
        "data_dir": str(root),
        "num_images": len(kept),
        "num_classes": len(classes),
        "splits": {name: sum(c[name] for c in counts.values()) for name in SPLITS},
        "counts": counts,
        "image_short_side": {
            "min": int(min(short_sides)),
            "median": float(np.median(short_sides)),
            "max": int(max(short_sides)),
        },
        "num_skipped": len(skipped),
        "skipped_by_reason": dict(Counter(s.reason.split(":")[0] for s in skipped)),
        "skipped": [
            {"path": s.path, "reason": s.reason} for s in sorted(skipped, key=lambda s: s.path)
        ],
    }
    return classes, rows, report


INDEX_HEADER = ["path", "label", "split", "sha256", "width", "height"]


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
