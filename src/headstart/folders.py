"""Walking an image folder: every file below data.dir is a candidate image of a class, or skipped
with a reason.

An ImageFolder is `<root>/<class>/<image>`; images in sub-folders of a class folder belong to
that class. A pre-split layout, `<root>/<train|val|test>/<class>/<image>`, keeps its splits.
Links are followed only inside data.dir; hidden and system files are never classes or samples.
Only regular files are opened (a FIFO would block prepare forever), and a name that is not
valid UTF-8 cannot be written to the index: both are skipped with their reason.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from headstart import store
from headstart.errors import DataError, MissingFileError
from headstart.images import MAX_ASPECT_RATIO, UnusableImage, check_regular, decode_image
from headstart.io import is_utf8, printable, sha256_file, utf8_safe
from headstart.near_copies import perceptual_hash

log = logging.getLogger(__name__)

# Never classes, never samples: OS and tool droppings (plus every name starting with a dot).
SYSTEM_NAMES = frozenset({"Thumbs.db", "desktop.ini", "__MACOSX"})
# The splits, in this order everywhere; also the folder names of a pre-split layout.
SPLITS = ("train", "val", "test")


# Why a file under data.dir is not in the index (codes in report.json's skipped list).
SKIP_REASONS = {
    "hidden": "hidden or system file (.*, __MACOSX, Thumbs.db, desktop.ini)",
    "not_image": "not an image (extension not an image type, and not decodable)",
    "unreadable": "image extension, but the file does not decode",
    "truncated": "image data ends early (partial download or copy)",
    "too_large": "more pixels than Pillow's decompression-bomb limit",
    "extreme_aspect": f"long side more than {MAX_ASPECT_RATIO}x the short side",
    "not_regular": "not a regular file (FIFO, socket or device)",
    "unencodable_name": "file name is not valid UTF-8; rename it",
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
    phash: str = ""  # perceptual hash (headstart.near_copies); "" when not computed


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str  # a key of SKIP_REASONS
    detail: str = ""

    def __post_init__(self):
        # report.json is UTF-8: bytes of a name that are not (unencodable_name, or a link's
        # target) are kept as \xNN escapes, so the report can always be written.
        object.__setattr__(self, "path", utf8_safe(self.path))
        object.__setattr__(self, "detail", utf8_safe(self.detail))


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
    real: str  # the file's real path (links resolved): a link to an indexed file is a duplicate


class _Walker:
    """Lists every entry below data.dir once: candidates for the index, or skipped files."""

    def __init__(self, root: Path):
        self.root = root
        self.real_root = Path(os.path.realpath(root))
        self.candidates: list[_Candidate] = []
        self.skipped: list[Skipped] = []

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def skip_tree(self, path: Path, reason: str, detail: str = "") -> None:
        """Skip a file, or every file below a folder (without following links)."""
        if path.is_dir() and not path.is_symlink():
            for dirpath, _, filenames in os.walk(path):
                for name in sorted(filenames):
                    relative = self.relative(Path(dirpath) / name)
                    self.skipped.append(Skipped(relative, reason, detail))
        else:
            self.skipped.append(Skipped(self.relative(path), reason, detail))

    def skip_unencodable(self, path: Path) -> None:
        """A file, or every file below a folder, whose name is not valid UTF-8: it cannot be
        written to index.csv (nor, for a class folder, to classes.json)."""
        self.skip_tree(path, "unencodable_name", f"{os.fsencode(path.name)!r} is not valid UTF-8")

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
        real = os.path.realpath(folder)
        self._walk(folder, real, label, given_split, via_link=False, active={real})

    def _walk(
        self, folder, real_folder: str, label, given_split, via_link: bool, active: set[str]
    ) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = Path(entry.path)
            if is_hidden(entry.name):
                self.skip_tree(path, "hidden")
                continue
            if not is_utf8(entry.name):
                self.skip_unencodable(path)
                continue
            is_link = entry.is_symlink()
            if is_link and not path.exists():
                self.skipped.append(
                    Skipped(self.relative(path), "link_dangling", os.readlink(path))
                )
                continue
            # Only a link can lead elsewhere: resolving every path costs an lstat per folder
            # level per file (seconds at 10,000 files, on every run).
            real = os.path.realpath(path) if is_link else os.path.join(real_folder, entry.name)
            if is_link and not Path(real).is_relative_to(self.real_root):
                self.skipped.append(Skipped(self.relative(path), "link_outside", real))
                continue
            if entry.is_dir():
                if real in active or self.real_root.is_relative_to(real):
                    self.skipped.append(Skipped(self.relative(path), "link_loop", real))
                    continue
                linked = via_link or is_link
                self._walk(path, real, label, given_split, linked, active | {real})
            else:
                try:
                    check_regular(path)  # never opened otherwise: a FIFO would block prepare
                except UnusableImage as error:
                    self.skipped.append(Skipped(self.relative(path), error.reason, error.detail))
                    continue
                relative = self.relative(path)
                linked = via_link or is_link
                self.candidates.append(_Candidate(path, relative, label, given_split, linked, real))


def index_image_folder(root: Path, perceptual_hashes: bool = False) -> FolderIndex:
    """Every file under root: a decodable image of a class, or skipped with a reason.
    `perceptual_hashes`: also hash each decoded image (Sample.phash), for data.near_copies.

    Layouts: `<root>/<class>/...`, or pre-split `<root>/<train|val|test>/<class>/...` (used
    when the top-level folders are `train` plus optionally `val` and `test`).
    """
    if not root.is_dir():
        raise MissingFileError(
            f"{root}: data.dir does not exist or is not a directory; point data.dir in "
            "params.yaml at an ImageFolder (<root>/<class>/<image>)"
        )
    walker = _Walker(root)
    top = sorted(os.scandir(root), key=lambda e: e.name)
    folders = {
        e.name
        for e in top
        if e.is_dir() and not e.is_symlink() and not is_hidden(e.name) and is_utf8(e.name)
    }
    presplit = "train" in folders and folders <= set(SPLITS)
    class_folders: list[tuple[Path, str | None]] = []

    def add_folder_entries(entries, given_split: str | None) -> None:
        for entry in entries:
            path = Path(entry.path)
            if is_hidden(entry.name):
                walker.skip_tree(path, "hidden")
            elif not is_utf8(entry.name):  # not a class name classes.json could hold
                walker.skip_unencodable(path)
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
        raise DataError(
            f"{root}: expected one sub-folder per class, found {len(classes)} "
            f"({', '.join(map(printable, classes)) or 'none'}); a classifier needs at least two "
            "classes"
        )
    for folder, given_split in class_folders:
        walker.walk_class(folder, unicodedata.normalize("NFC", folder.name), given_split)

    index = FolderIndex(classes, [], walker.skipped, presplit)
    shelf = store.open_shelf("prepare", validation_key(perceptual_hashes), root)
    # Real files first, then links: a link to an indexed file is a duplicate, not a sample.
    indexed_at: dict[str, str] = {}
    for candidate in sorted(walker.candidates, key=lambda c: (c.via_link, c.relative)):
        if candidate.real in indexed_at:
            index.skipped.append(
                Skipped(candidate.relative, "link_duplicate", indexed_at[candidate.real])
            )
            continue
        indexed_at[candidate.real] = candidate.relative
        digest = sha256_file(candidate.path)
        try:
            found = _validate(candidate.path, digest, shelf, perceptual_hashes)
        except UnusableImage as error:
            index.skipped.append(Skipped(candidate.relative, error.reason, error.detail))
            continue
        index.modes[found["mode"]] += 1
        index.multi_frame += found["frames"] > 1
        index.exif_errors += found["exif_error"]
        index.samples.append(
            Sample(
                candidate.relative,
                candidate.label,
                digest,
                found["width"],
                found["height"],
                candidate.given_split,
                found["phash"],
            )
        )
    index.samples.sort(key=lambda s: s.path)
    index.skipped.sort(key=lambda s: s.path)
    if shelf is not None:
        log.info(
            "validated %d files: %d found in the store, %d decoded",
            shelf.hits + shelf.misses,
            shelf.hits,
            shelf.misses,
        )
        if shelf.written:
            store.prune_quietly()
    return index


# Bump when what prepare records of a decoded file, or how, changes outside images.py and
# near_copies.py (whose source is part of the key already): older entries then miss.
VALIDATION_VERSION = 1


def validation_key(perceptual_hashes: bool) -> dict:
    """What a validated file's record depends on besides its bytes: the code, the limits,
    Pillow and imagehash."""
    from PIL import Image

    from headstart import images, near_copies

    return {
        "kind": "prepare",
        "version": VALIDATION_VERSION,
        "perceptual_hashes": perceptual_hashes,
        "max_aspect_ratio": MAX_ASPECT_RATIO,
        "max_image_pixels": Image.MAX_IMAGE_PIXELS,
        "python": platform.python_version(),
        "packages": {name: metadata.version(name) for name in ("pillow", "imagehash", "numpy")},
        "code": store.source_digest(images, near_copies),
    }


def _validate(path: Path, digest: str, shelf: store.Shelf | None, perceptual_hashes: bool):
    """{mode, frames, exif_error, width, height, phash} of a decodable file: from the store
    when these bytes were validated before, else by decoding it fully (UnusableImage when it
    cannot be used; refusals are not stored: their reason can depend on the file's name)."""
    if shelf is not None and (payload := shelf.get(digest)) is not None:
        found = json.loads(payload)
        if found["exif_error"]:
            log.warning(
                "%s: unreadable EXIF orientation; using the image as stored", printable(str(path))
            )
        return found
    decoded = decode_image(path)
    width, height = decoded.image.size
    found = {
        "mode": decoded.mode,
        "frames": decoded.frames,
        "exif_error": decoded.exif_error,
        "width": width,
        "height": height,
        "phash": perceptual_hash(decoded.image) if perceptual_hashes else "",
    }
    if shelf is not None:
        shelf.put(digest, json.dumps(found, sort_keys=True).encode())
    return found


def _check_classes(root: Path, names: list[str]) -> None:
    """Folder names that differ only by case or Unicode normalisation would be one class on
    some file systems and two on others: refuse them."""
    by_key: dict[str, list[str]] = {}
    for name in names:
        by_key.setdefault(unicodedata.normalize("NFC", name).casefold(), []).append(name)
    clashes = sorted(ascii(n) for group in by_key.values() if len(group) > 1 for n in group)
    if clashes:
        raise DataError(
            f"{root}: class folders {', '.join(clashes)} differ only by case or Unicode form; "
            "rename them so every class name is unique ignoring case"
        )
