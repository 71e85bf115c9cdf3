"""The prepared index: what prepare writes (index.csv, classes.json, report.json) and how every
later stage reads it back, by column.
"""

from __future__ import annotations

import array
import csv
import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.errors import DataError
from headstart.folders import SKIP_REASONS, SPLITS, index_image_folder
from headstart.io import printable, read_json, sha256_file
from headstart.near_copies import split_groups
from headstart.splits import assign_splits

log = logging.getLogger(__name__)

# data/prepared/index.csv's columns, written by prepare, read by read_index.
INDEX_HEADER = ["path", "label", "split", "sha256", "width", "height"]


def prepare_index(
    root: Path, val_fraction: float, test_fraction: float, seed: int, near_copies: str = "off"
) -> tuple[list[str], list[list[str]], dict]:
    """Index and split an ImageFolder: (classes, index rows [path, label, split, sha256,
    width, height], report with counts per class and split and every skipped file).
    `near_copies`: `phash` keeps images with equal perceptual hashes in one split."""
    index = index_image_folder(root, perceptual_hashes=near_copies != "off")
    group_of, joined = split_groups(index.samples, near_copies)
    split, more_skipped = assign_splits(index.samples, val_fraction, test_fraction, seed, group_of)
    skipped = sorted(index.skipped + more_skipped, key=lambda s: s.path)
    kept = [s for s in index.samples if s.path in split]
    counts = {c: {name: 0 for name in SPLITS} for c in index.classes}
    for s in kept:
        counts[s.label][split[s.path]] += 1
    for label, per_split in counts.items():
        missing = [name for name in SPLITS if per_split[name] == 0]
        if missing:
            raise DataError(
                f"{root}: class {label!r} has no usable image in {', '.join(missing)} "
                f"({sum(per_split.values())} in all); add images or remove the class folder "
                "(skipped files and reasons: data/prepared/report.json)"
            )
    rows = [[s.path, s.label, split[s.path], s.sha256, str(s.width), str(s.height)] for s in kept]
    per_class = {label: sum(per_split.values()) for label, per_split in counts.items()}
    short_sides = [min(s.width, s.height) for s in kept]
    report = {
        "data_dir": str(root),
        "layout": "pre-split" if index.presplit else "class folders",
        "num_images": len(kept),
        "num_classes": len(index.classes),
        "splits": {name: sum(c[name] for c in counts.values()) for name in SPLITS},
        "counts": counts,
        "images_per_class": per_class,
        # Largest class over smallest: 1.0 is balanced (docs/data.md#skewed-classes).
        "imbalance_ratio": round(max(per_class.values()) / min(per_class.values()), 3),
        "image_short_side": {
            "min": int(min(short_sides)),
            "median": float(np.median(short_sides)),
            "max": int(max(short_sides)),
        },
        "image_modes": dict(sorted(index.modes.items())),
        "multi_frame": index.multi_frame,
        "exif_errors": index.exif_errors,
        "near_copies": near_copies,
        **joined,  # near_copy_groups, near_copy_images: joined into one split by their hash
        "num_skipped": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(s.reason for s in skipped).items())),
        "skip_reasons": {r: SKIP_REASONS[r] for r in sorted({s.reason for s in skipped})},
        "skipped": [{"path": s.path, "reason": s.reason, "detail": s.detail} for s in skipped],
    }
    return index.classes, rows, report


@dataclass(frozen=True)
class Images:
    """Indexed images by column, in index order (sorted by path): a path string and a few
    fixed-width numbers an image, a fraction of what a dict per index row costs, so memory
    stays small at hundreds of thousands of images (tests/test_data.py bounds it).

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
    fingerprint: str = ""  # sha256 of the class list and index: which images, labels, splits

    def split(self, name: str) -> Images:
        return self.images.split(name)


def load_prepared(data_root: Path, prepared_dir: Path) -> PreparedData:
    # Hashed before the index is read, so the hash's read buffer never adds to its columns.
    digest = hashlib.sha256()
    for name in ("classes.json", "index.csv"):
        digest.update(sha256_file(prepared_dir / name).encode())
    classes = read_json(prepared_dir / "classes.json")
    images = read_index(prepared_dir / "index.csv", classes, data_root)
    report = read_json(prepared_dir / "report.json")
    return PreparedData(data_root, classes, images, report, digest.hexdigest())


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
            raise DataError(
                f"{index_csv}: header {header} is not {INDEX_HEADER}; rerun prepare (dvc repro)"
            )
        for row in reader:
            if not row:  # a blank line
                continue
            digest = row[3].encode() if len(row) == len(INDEX_HEADER) else b""
            if len(digest) != 64 or row[2] not in split_index:
                raise DataError(
                    f"{index_csv}, line {reader.line_num}: {row} is not {','.join(INDEX_HEADER)} "
                    f"with a split in {SPLITS} and a 64-digit sha256; rerun prepare (dvc repro)"
                )
            path, label, split = row[:3]
            if not inside(path):
                raise DataError(
                    f"{index_csv}: path {path!r} leaves {inside.root}; rerun prepare (dvc repro)"
                )
            if label not in class_index:
                unknown.add(label)
            paths.append(path)
            labels.append(class_index.get(label, -1))
            splits.append(split_index[split])
            digests += digest
    if unknown:
        raise DataError(
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


# Classes listed in the summary; report.json has them all.
SUMMARY_ROWS = 30
# Largest class over smallest above which prepare warns and names the params for skewed classes.
IMBALANCE_WARNING = 5.0


def summary(report: dict) -> None:
    """Log the counts per class and split, and what was skipped, for the person running prepare.
    Class names are shown with control characters escaped (io.printable)."""
    width = min(max(len(printable(c)) for c in report["counts"]), 40) + 2
    lines = [f"{'class':<{width}}" + "".join(f"{s:>8}" for s in SPLITS)]
    shown = list(report["counts"].items())
    for label, counts in shown[:SUMMARY_ROWS]:
        lines.append(f"{printable(label):<{width}}" + "".join(f"{counts[s]:>8}" for s in SPLITS))
    if len(shown) > SUMMARY_ROWS:
        lines.append(f"... {len(shown) - SUMMARY_ROWS} more classes (see report.json)")
    lines.append(f"{'total':<{width}}" + "".join(f"{report['splits'][s]:>8}" for s in SPLITS))
    log.info(
        "%d images in %d classes:\n%s",
        report["num_images"],
        report["num_classes"],
        "\n".join(lines),
    )
    ratio = report.get("imbalance_ratio", 1.0)
    if ratio > IMBALANCE_WARNING:
        sizes = report["images_per_class"]
        largest, smallest = max(sizes, key=sizes.get), min(sizes, key=sizes.get)
        log.warning(
            "skewed classes: %s has %d images, %s %d (%.1f:1); consider head.class_weight: "
            "balanced and finetune.class_weight: balanced, and read balanced_accuracy beside "
            "accuracy (docs/data.md#skewed-classes)",
            printable(largest),
            sizes[largest],
            printable(smallest),
            sizes[smallest],
            ratio,
        )
    if report.get("near_copy_groups"):
        log.info(
            "%d groups of near-copies (equal perceptual hash, %d images) each kept in one split",
            report["near_copy_groups"],
            report["near_copy_images"],
        )
    if report["multi_frame"] or report["exif_errors"]:
        log.info(
            "%d animated file(s) used at frame 0; %d with unreadable EXIF orientation",
            report["multi_frame"],
            report["exif_errors"],
        )
    if report["num_skipped"]:
        for reason, count in report["skipped_by_reason"].items():
            log.warning("skipped %d file(s): %s (%s)", count, reason, SKIP_REASONS[reason])
        log.warning("every skipped file, with its reason, is listed in report.json")
