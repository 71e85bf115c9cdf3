"""Image folders: the built-in dataset, indexing, splitting, decoding, transforms.

An ImageFolder is `<root>/<class>/<image>`; images in sub-folders of a class folder belong to
that class. Splits come from file content (sha256) and the seed, never from listing order, so
identical bytes always land in the same split and adding images does not move existing ones
(except in classes so small that an image had to be moved to give them a val or test image).
"""

from __future__ import annotations

import array
import csv
import hashlib
import logging
import os
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms

from headstart.images import UnusableImage, decode_image, load_rgb

if TYPE_CHECKING:  # data does not import distributed: prepare does not depend on it
    from headstart.distributed import World

log = logging.getLogger(__name__)

# Never classes, never samples: OS and tool droppings (plus every name starting with a dot).
SYSTEM_NAMES = frozenset({"Thumbs.db", "desktop.ini", "__MACOSX"})
SPLITS = ("train", "val", "test")
# data/prepared/index.csv's columns, written by prepare, read by load_prepared.
INDEX_HEADER = ["path", "label", "split", "sha256", "width", "height"]

# Why a file under data.dir is not in the index (codes in report.json's skipped list).
SKIP_REASONS = {
    "hidden": "hidden or system file (.*, __MACOSX, Thumbs.db, desktop.ini)",
    "not_image": "not an image (extension not an image type, and not decodable)",
    "unreadable": "image extension, but the file does not decode",
    "truncated": "image data ends early (partial download or copy)",
    "too_large": "more pixels than Pillow's decompression-bomb limit",
    "root_file": "file directly in data.dir, outside any class folder",
    "link_outside": "symbolic link to a path outside data.dir",
    "link_dangling": "symbolic link to nothing",
    "link_loop": "symbolic link to a folder already being walked (a loop)",
    "link_duplicate": "symbolic link to a file already indexed under another path",
    "conflicting_label": "the same bytes are filed under more than one class",
    "duplicate_across_splits": "the same bytes are in a more held-out pre-split folder",
}


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the data root, POSIX separators
    label: str
    sha256: str
    width: int
    height: int
    given_split: str | None = None  # from a pre-split layout <root>/<split>/<class>/...


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str  # a key of SKIP_REASONS
    detail: str = ""


@dataclass
class FolderIndex:
    classes: list[str]
    samples: list[Sample]
    skipped: list[Skipped]
    presplit: bool
    modes: Counter = field(default_factory=Counter)  # the files' own image modes
    multi_frame: int = 0  # animated files (frame 0 used)
    exif_errors: int = 0  # unreadable EXIF orientation (used as stored)


def is_hidden(name: str) -> bool:
    """Hidden or system entries: never classes, never samples."""
    return name.startswith(".") or name in SYSTEM_NAMES


@dataclass(frozen=True)
class _Candidate:
    path: Path
    relative: str
    label: str
    given_split: str | None
    via_link: bool  # reached through a symbolic link (file or folder)


class _Walker:
    """Lists every entry below data.dir once: candidates for the index, or skipped files."""

    def __init__(self, root: Path):
        self.root = root
        self.real_root = Path(os.path.realpath(root))
        self.candidates: list[_Candidate] = []
        self.skipped: list[Skipped] = []

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def skip_tree(self, path: Path, reason: str) -> None:
        """Skip a file, or every file below a folder (without following links)."""
        if path.is_dir() and not path.is_symlink():
            for dirpath, _, filenames in os.walk(path):
                for name in sorted(filenames):
                    self.skipped.append(Skipped(self.relative(Path(dirpath) / name), reason))
        else:
            self.skipped.append(Skipped(self.relative(path), reason))

    def top_level_link(self, path: Path) -> Skipped:
        """Why a symbolic link where a class (or split) folder is expected is not followed."""
        relative = self.relative(path)
        if not path.exists():
            return Skipped(relative, "link_dangling", os.readlink(path))
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self.real_root):
            return Skipped(relative, "link_outside", str(real))
        if self.real_root.is_relative_to(real):
            return Skipped(relative, "link_loop", str(real))
        if real.is_dir():
            return Skipped(relative, "link_duplicate", real.relative_to(self.real_root).as_posix())
        return Skipped(relative, "root_file")

    def walk_class(self, folder: Path, label: str, given_split: str | None) -> None:
        active: set[str] = {os.path.realpath(folder)}
        self._walk(folder, label, given_split, via_link=False, active=active)

    def _walk(self, folder, label, given_split, via_link: bool, active: set[str]) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = Path(entry.path)
            if is_hidden(entry.name):
                self.skip_tree(path, "hidden")
                continue
            is_link = entry.is_symlink()
            if is_link and not path.exists():
                self.skipped.append(
                    Skipped(self.relative(path), "link_dangling", os.readlink(path))
                )
                continue
            real = os.path.realpath(path)
            if not Path(real).is_relative_to(self.real_root):
                self.skipped.append(Skipped(self.relative(path), "link_outside", real))
                continue
            if entry.is_dir():
                if real in active or self.real_root.is_relative_to(real):
                    self.skipped.append(Skipped(self.relative(path), "link_loop", real))
                    continue
                self._walk(path, label, given_split, via_link or is_link, active | {real})
            else:
                self.candidates.append(
                    _Candidate(path, self.relative(path), label, given_split, via_link or is_link)
                )


def index_image_folder(root: Path) -> FolderIndex:
    """Every file under root: a decodable image of a class, or skipped with a reason.

    Layouts: `<root>/<class>/...`, or pre-split `<root>/<train|val|test>/<class>/...` (used
    when the top-level folders are `train` plus optionally `val` and `test`).
    """
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root}: data.dir does not exist or is not a directory; point data.dir in "
            "params.yaml at an ImageFolder (<root>/<class>/<image>)"
        )
    walker = _Walker(root)
    top = sorted(os.scandir(root), key=lambda e: e.name)
    folders = {e.name for e in top if e.is_dir() and not e.is_symlink() and not is_hidden(e.name)}
    presplit = "train" in folders and folders <= set(SPLITS)
    class_folders: list[tuple[Path, str | None]] = []

    def add_folder_entries(entries, given_split: str | None) -> None:
        for entry in entries:
            path = Path(entry.path)
            if is_hidden(entry.name):
                walker.skip_tree(path, "hidden")
            elif entry.is_symlink():
                # A class is a real folder: a link here would name a second class for the
                # same images (or loop), so it is reported and not followed.
                walker.skipped.append(walker.top_level_link(path))
            elif not entry.is_dir():
                walker.skipped.append(Skipped(walker.relative(path), "root_file"))
            elif presplit and given_split is None:
                add_folder_entries(sorted(os.scandir(path), key=lambda e: e.name), entry.name)
            else:
                class_folders.append((path, given_split))

    add_folder_entries(top, None)
    for split in {given for _, given in class_folders}:  # spellings side by side in one folder
        _check_classes(root, [folder.name for folder, given in class_folders if given == split])
    # Across split folders one NFC name is one class; names differing by case are not.
    _check_classes(root, sorted({unicodedata.normalize("NFC", f.name) for f, _ in class_folders}))
    classes = sorted({unicodedata.normalize("NFC", folder.name) for folder, _ in class_folders})
    if len(classes) < 2:
        raise ValueError(
            f"{root}: expected one sub-folder per class, found {len(classes)} "
            f"({', '.join(classes) or 'none'}); a classifier needs at least two classes"
        )
    for folder, given_split in class_folders:
        walker.walk_class(folder, unicodedata.normalize("NFC", folder.name), given_split)

    index = FolderIndex(classes, [], walker.skipped, presplit)
    # Real files first, then links: a link to an indexed file is a duplicate, not a sample.
    indexed_at: dict[str, str] = {}
    for candidate in sorted(walker.candidates, key=lambda c: (c.via_link, c.relative)):
        real = os.path.realpath(candidate.path)
        if real in indexed_at:
            index.skipped.append(Skipped(candidate.relative, "link_duplicate", indexed_at[real]))
            continue
        indexed_at[real] = candidate.relative
        try:
            decoded = decode_image(candidate.path)
        except UnusableImage as error:
            index.skipped.append(Skipped(candidate.relative, error.reason, error.detail))
            continue
        index.modes[decoded.mode] += 1
        index.multi_frame += decoded.frames > 1
        index.exif_errors += decoded.exif_error
        width, height = decoded.image.size
        digest = hashlib.sha256(candidate.path.read_bytes()).hexdigest()
        index.samples.append(
            Sample(
                candidate.relative, candidate.label, digest, width, height, candidate.given_split
            )
        )
    index.samples.sort(key=lambda s: s.path)
    index.skipped.sort(key=lambda s: s.path)
    return index


def _check_classes(root: Path, names: list[str]) -> None:
    """Folder names that differ only by case or Unicode normalisation would be one class on
    some file systems and two on others: refuse them."""
    by_key: dict[str, list[str]] = {}
    for name in names:
        by_key.setdefault(unicodedata.normalize("NFC", name).casefold(), []).append(name)
    clashes = sorted(ascii(n) for group in by_key.values() if len(group) > 1 for n in group)
    if clashes:
        raise ValueError(
            f"{root}: class folders {', '.join(clashes)} differ only by case or Unicode form; "
            "rename them so every class name is unique ignoring case"
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

    Pre-split layouts keep their folders' splits; only a split with no folder is carved from
    train as above. The same bytes in two pre-split folders stay only in the more held-out one
    (test, then val), so nothing leaks between splits.
    """
    labels_by_hash: dict[str, set[str]] = {}
    for sample in samples:
        labels_by_hash.setdefault(sample.sha256, set()).add(sample.label)
    conflicts = {h for h, labels in labels_by_hash.items() if len(labels) > 1}
    skipped = [
        Skipped(s.path, "conflicting_label", f"classes {sorted(labels_by_hash[s.sha256])}")
        for s in samples
        if s.sha256 in conflicts
    ]
    kept = [s for s in samples if s.sha256 not in conflicts]
    given_splits = {s.given_split for s in kept} - {None}
    if given_splits:
        held_out = {}  # sha256 -> the most held-out split its bytes appear in
        for sample in kept:
            rank = SPLITS.index(sample.given_split)
            held_out[sample.sha256] = max(held_out.get(sample.sha256, 0), rank)
        for sample in kept:
            if SPLITS.index(sample.given_split) < held_out[sample.sha256]:
                skipped.append(
                    Skipped(
                        sample.path,
                        "duplicate_across_splits",
                        f"also in {SPLITS[held_out[sample.sha256]]}",
                    )
                )
        kept = [s for s in kept if SPLITS.index(s.given_split) == held_out[s.sha256]]
    carve = [name for name in ("test", "val") if name not in given_splits]
    fractions = {
        "test": test_fraction if "test" in carve else 0.0,
        "val": val_fraction if "val" in carve else 0.0,
    }

    split: dict[str, str] = {
        s.path: s.given_split for s in kept if s.given_split in ("val", "test")
    }
    by_class: dict[str, list[Sample]] = {}
    for sample in kept:
        if sample.path not in split:
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
                if u < fractions["test"]
                else ("val" if u < fractions["test"] + fractions["val"] else "train")
            )
        for name in carve:
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
    """(image tensor, label index) for paths relative to root; errors name the file.

    `decode_size`: the input size the transform resizes to; large JPEGs are decoded at reduced
    scale, never below it (images.decode_image's min_side). None: always a full decode.
    """

    def __init__(
        self,
        root: Path,
        paths: list[str],
        labels: Sequence[int] | np.ndarray,
        transform,
        decode_size: int | None = None,
    ):
        self.root = root
        self.paths = paths
        self.labels = labels
        self.transform = transform
        self.decode_size = decode_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        """`item`: an index, or (index, seed) from SeededOrder: the transform's random draws
        then come from that seed alone."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        path = self.root / self.paths[index]
        label = int(self.labels[index])  # a Python int: batches collate to int64
        try:
            image = load_rgb(path, self.decode_size)
            if seed is None:
                return self.transform(image), label
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.transform(image), label
        except Exception as error:  # re-raised with the file named, never swallowed
            raise RuntimeError(f"{path}: cannot decode or transform image: {error}") from error


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
    images: Images,
    transform,
    *,
    decode_size: int | None,
    batch_size: int,
    num_workers: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    world: World | None = None,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """Batches of (images (B, 3, S, S), labels (B,) int64) for `images`, in their order unless
    shuffled; workers seeded. `decode_size` is the transform's input size S (see ImageDataset);
    `shuffle`, `generator` and `world` as in `sampling`; `pin_memory` for fast copies to a GPU.
    """
    per_image, batch_normalize = _split_normalization(transform)
    dataset = ImageDataset(root, images.paths, images.labels, per_image, decode_size)
    loader = torch.utils.data.DataLoader if batch_normalize is None else _NormalizingLoader
    options = {} if batch_normalize is None else {"normalize": batch_normalize}
    return loader(
        dataset,
        num_workers=num_workers,
        worker_init_fn=_seed_worker,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        **sampling(dataset, batch_size, shuffle, generator, world),
        **options,
    )


def _split_normalization(transform) -> tuple[Any, transforms.Normalize | None]:
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


class _NormalizingLoader(torch.utils.data.DataLoader):
    """A DataLoader whose dataset gives uint8 images: batches come out as ToTensor + `normalize`
    would have made each image (see _split_normalization)."""

    def __init__(self, *args, normalize: transforms.Normalize, pin_memory: bool, **kwargs):
        # The uint8 batches are not pinned: only the float batches made from them are copied
        # to a GPU.
        super().__init__(*args, pin_memory=False, **kwargs)
        self.pin_batches = pin_memory
        self.mean = torch.as_tensor(normalize.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(normalize.std, dtype=torch.float32).view(-1, 1, 1)

    def __iter__(self) -> Iterator:
        for images, labels in super().__iter__():
            # ToTensor: float32 / 255; Normalize: (x - mean) / std, channel by channel.
            pixels = images.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)
            yield (pixels.pin_memory() if self.pin_batches else pixels), labels


def sampling(
    dataset,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    world: World | None = None,
) -> dict[str, Any]:
    """DataLoader arguments (sampler, batch size, generator) that make the batch order a
    function of `generator` alone, and share the batches among the processes of `world`.

    The shuffle draws one permutation per epoch from `generator`, and nothing else does: a
    DataLoader also draws a seed from its own generator (or torch's global one) whenever it
    starts an iterator, which happens once for persistent worker processes but every epoch
    for in-process loading, and would shift both the order and the global random stream
    (dropout, stochastic depth). So the loader gets a private generator, seeded from
    `generator`'s seed without consuming it: images from files and cached tensors are then
    visited in the same order, and training draws the same random numbers. A shuffled image
    dataset also gets a seed per image and epoch (SeededOrder) for its augmentation.

    With several processes (`world`: this process's distributed.World; None: one process), a
    shuffled loader (training) deals every global batch out among
    them (`DealtBatches`, batches of batch_size / world.size), an unshuffled one (inference)
    gives each process whole batches (`WholeBatches`), gathered back in order by
    distributed.gather_in_order.
    """
    seed = generator.initial_seed() if generator is not None else 0
    order = torch.utils.data.RandomSampler(dataset, generator=generator) if shuffle else None
    if shuffle and isinstance(dataset, ImageDataset):
        order = SeededOrder(order, seed)  # augmentation independent of workers and processes
    rank = world.rank if world is not None else 0
    if world is not None and world.size > 1:
        if shuffle:
            order = DealtBatches(order, batch_size, world)
            batch_size //= world.size
        else:
            order = WholeBatches(len(dataset), batch_size, world)
    # Each rank's worker processes draw their own augmentations (rank 0's are one process's).
    loader_generator = torch.Generator().manual_seed(seed + rank)
    return {"sampler": order, "batch_size": batch_size, "generator": loader_generator}


class SeededOrder(torch.utils.data.Sampler):
    """`order`'s indices paired with a seed each, (index, seed), for ImageDataset: an image's
    augmentation then depends on the seed, the epoch and the image alone, not on which loader
    worker or which process (compute.num_workers, compute.nproc) transforms it. The seeds come
    from a generator of their own, so the order's generator draws what it would without them.
    """

    def __init__(self, order, seed: int):
        self.order = order
        self.seeds = torch.Generator().manual_seed(seed + 0x5EED)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = int(torch.randint(0, 2**62, (1,), generator=self.seeds))
        for index in self.order:
            yield index, epoch + index

    def __len__(self) -> int:
        return len(self.order)


class WholeBatches(torch.utils.data.Sampler):
    """Inference with several processes: the single-process batches (consecutive items,
    `batch_size` each), batch k to rank k % size. Batched by `batch_size` again, a rank's
    share falls into exactly those batches (only the very last batch can be short)."""

    def __init__(self, num_items: int, batch_size: int, world: World):
        self.num_items, self.batch_size, self.world = num_items, batch_size, world

    def __iter__(self) -> Iterator[int]:
        starts = range(0, self.num_items, self.batch_size)[self.world.rank :: self.world.size]
        for start in starts:
            yield from range(start, min(start + self.batch_size, self.num_items))

    def __len__(self) -> int:
        num_batches = -(-self.num_items // self.batch_size)
        mine = range(self.world.rank, num_batches, self.world.size)
        short = num_batches * self.batch_size - self.num_items  # missing from the last batch
        return len(mine) * self.batch_size - (short if num_batches - 1 in mine else 0)


class DealtBatches(torch.utils.data.Sampler):
    """Training with several processes (DistributedDataParallel): the single-process order
    (`order`, reshuffled every epoch) cut into global batches of `batch_size`, each dealt out
    one item per rank in turn, so rank r's k-th batch is items r, r + size, ... of global batch
    k; with DDP averaging the gradients, a step is the single-process step. Every rank must
    take the same number of steps: a last global batch with fewer items than ranks is left out
    (at most size - 1 items an epoch)."""

    def __init__(self, order, batch_size: int, world: World):
        if batch_size % world.size:
            raise ValueError(
                f"a batch of {batch_size} does not split evenly over {world.size} processes; "
                "make finetune.batch_size a multiple of compute.nproc"
            )
        self.order, self.batch_size, self.world = order, batch_size, world

    def __iter__(self) -> Iterator[int]:
        order = list(self.order)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) >= self.world.size:
                yield from batch[self.world.rank :: self.world.size]

    def __len__(self) -> int:
        full, rest = divmod(len(self.order), self.batch_size)
        share = full * (self.batch_size // self.world.size)
        if rest >= self.world.size:
            share += len(range(self.world.rank, rest, self.world.size))
        return share


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow it.
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


@dataclass(frozen=True)
class Images:
    """Indexed images by column, in index order (sorted by path): about 170 bytes an image
    for paths like `class_07/IMG_20240101_000123.jpg`, where a dict per index row took about
    690 (tests/test_data.py holds it under 250).

    The index's width and height are not kept: nothing after prepare reads them.
    """

    paths: list[str]  # relative to the data root, POSIX separators
    labels: np.ndarray  # (N,) int64 indices into the class list
    splits: np.ndarray  # (N,) int8 indices into SPLITS
    sha256: np.ndarray  # (N,) "S64" hex digests of the files' bytes

    def __post_init__(self):
        lengths = {len(self.paths), len(self.labels), len(self.splits), len(self.sha256)}
        if len(lengths) > 1:
            raise ValueError(f"Images columns differ in length: {sorted(lengths)}")

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, which) -> Images:
        """The images where the boolean mask `which` is true, or at the positions `which`, in
        that order."""
        which = np.asarray(which)
        positions = np.flatnonzero(which) if which.dtype == bool else which.astype(np.intp)
        return Images(
            [self.paths[i] for i in positions],
            self.labels[positions],
            self.splits[positions],
            self.sha256[positions],
        )

    def split(self, name: str) -> Images:
        """The images of one split (train, val or test), in index order."""
        return self.subset(self.splits == SPLITS.index(name))

    def in_split_order(self) -> tuple[Images, list[slice]]:
        """(every image, train first, then val, then test, each split in index order; each
        split's rows among them, in SPLITS order): extract runs over them in one pass, with one
        set of loader processes instead of one per split."""
        order = np.argsort(self.splits, kind="stable")
        ends = np.cumsum(np.bincount(self.splits, minlength=len(SPLITS))).tolist()
        return self.subset(order), [slice(a, b) for a, b in zip([0, *ends], ends, strict=False)]


@dataclass(frozen=True)
class PreparedData:
    """What prepare wrote: the class list, the indexed images and the data report."""

    root: Path
    classes: list[str]
    images: Images
    report: dict

    def split(self, name: str) -> Images:
        return self.images.split(name)


def load_prepared(data_root: Path, prepared_dir: Path) -> PreparedData:
    from headstart.io import read_json

    classes = read_json(prepared_dir / "classes.json")
    images = read_index(prepared_dir / "index.csv", classes, data_root)
    report = read_json(prepared_dir / "report.json")
    return PreparedData(data_root, classes, images, report)


def read_index(index_csv: Path, classes: list[str], data_root: Path) -> Images:
    """index.csv as columns, filled row by row: memory holds the columns, never a row per
    image. Labels become indices into `classes`.

    Refuses labels not in `classes` and paths that leave `data_root`: a tampered or stale
    index must not make a stage read files outside data.dir.
    """
    class_index = {name: i for i, name in enumerate(classes)}
    split_index = {name: i for i, name in enumerate(SPLITS)}
    inside = _InsideRoot(data_root)
    paths: list[str] = []
    labels = array.array("q")  # int64, grown in place
    splits = array.array("b")  # int8
    digests = bytearray()  # 64 ASCII bytes an image
    unknown: set[str] = set()
    with open(index_csv, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != INDEX_HEADER:
            raise ValueError(
                f"{index_csv}: header {header} is not {INDEX_HEADER}; rerun prepare (dvc repro)"
            )
        for row in reader:
            if not row:  # a blank line
                continue
            digest = row[3].encode() if len(row) == len(INDEX_HEADER) else b""
            if len(digest) != 64 or row[2] not in split_index:
                raise ValueError(
                    f"{index_csv}, line {reader.line_num}: {row} is not {','.join(INDEX_HEADER)} "
                    f"with a split in {SPLITS} and a 64-digit sha256; rerun prepare (dvc repro)"
                )
            path, label, split = row[:3]
            if not inside(path):
                raise ValueError(
                    f"{index_csv}: path {path!r} leaves {inside.root}; rerun prepare (dvc repro)"
                )
            if label not in class_index:
                unknown.add(label)
            paths.append(path)
            labels.append(class_index.get(label, -1))
            splits.append(split_index[split])
            digests += digest
    if unknown:
        raise ValueError(
            f"{index_csv}: labels {sorted(unknown)} are not in classes.json; "
            "rerun prepare (dvc repro)"
        )
    # Views of the buffers just filled, not copies: no second copy of a column at the peak.
    return Images(
        paths,
        np.frombuffer(labels, dtype=np.int64),
        np.frombuffer(splits, dtype=np.int8),
        np.frombuffer(digests, dtype="S64"),
    )


class _InsideRoot:
    """Whether a path relative to root stays inside it once links are followed.

    As `(root / path).resolve().is_relative_to(root)`, but a folder's real path is computed
    once for a run of paths in that folder (the index is sorted by path), so a file costs one
    lstat (is it a link?) rather than one per component of its absolute path.
    """

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.prefix = os.path.join(self.root, "")  # with a trailing separator
        self.folder: str | None = None  # the last folder seen, as written
        self.real_folder = ""  # and with links followed

    def __call__(self, relative: str) -> bool:
        folder, name = os.path.split(os.path.join(self.root, relative))
        if name in ("", ".", ".."):  # not a file name: resolve the whole path
            real = os.path.realpath(os.path.join(self.root, relative))
        else:
            if folder != self.folder:
                self.folder, self.real_folder = folder, os.path.realpath(folder)
            real = os.path.join(self.real_folder, name)
            if os.path.islink(real):
                real = os.path.realpath(real)
        return real == str(self.root) or real.startswith(self.prefix)


def prepare_index(
    root: Path, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[str], list[list[str]], dict]:
    """Index and split an ImageFolder: (classes, index rows [path, label, split, sha256,
    width, height], report with counts per class and split and every skipped file)."""
    index = index_image_folder(root)
    split, more_skipped = assign_splits(index.samples, val_fraction, test_fraction, seed)
    skipped = sorted(index.skipped + more_skipped, key=lambda s: s.path)
    kept = [s for s in index.samples if s.path in split]
    counts = {c: {name: 0 for name in SPLITS} for c in index.classes}
    for s in kept:
        counts[s.label][split[s.path]] += 1
    for label, per_split in counts.items():
        missing = [name for name in SPLITS if per_split[name] == 0]
        if missing:
            raise ValueError(
                f"{root}: class {label!r} has no usable image in {', '.join(missing)} "
                f"({sum(per_split.values())} in all); add images or remove the class folder "
                "(skipped files and reasons: data/prepared/report.json)"
            )
    rows = [[s.path, s.label, split[s.path], s.sha256, str(s.width), str(s.height)] for s in kept]
    short_sides = [min(s.width, s.height) for s in kept]
    report = {
        "data_dir": str(root),
        "layout": "pre-split" if index.presplit else "class folders",
        "num_images": len(kept),
        "num_classes": len(index.classes),
        "splits": {name: sum(c[name] for c in counts.values()) for name in SPLITS},
        "counts": counts,
        "image_short_side": {
            "min": int(min(short_sides)),
            "median": float(np.median(short_sides)),
            "max": int(max(short_sides)),
        },
        "image_modes": dict(sorted(index.modes.items())),
        "multi_frame": index.multi_frame,
        "exif_errors": index.exif_errors,
        "num_skipped": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(s.reason for s in skipped).items())),
        "skip_reasons": {r: SKIP_REASONS[r] for r in sorted({s.reason for s in skipped})},
        "skipped": [{"path": s.path, "reason": s.reason, "detail": s.detail} for s in skipped],
    }
    return index.classes, rows, report


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
