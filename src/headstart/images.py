"""Decode any common image file to correct RGB, or say exactly why it cannot be used.

prepare and the data loaders decode through the same function, so an image that passed
prepare decodes the same way in every later stage. Pillow's pitfalls handled here: `verify()`
misses truncated files (we decode fully), `convert("RGB")` clips 16-bit images (we scale),
transparent pixels keep hidden colours (we composite on white), EXIF orientation is not applied
on open (we apply it), and decompression bombs only warn (we refuse them). Two more refusals
keep one file from stalling or exhausting a run: anything but a regular file (a FIFO would
block the open forever) and extreme aspect ratios (see MAX_ASPECT_RATIO).
"""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from headstart.io import printable

log = logging.getLogger(__name__)


# Extensions that promise an image: an undecodable file with another one is `not_image`.
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jfif",
        ".png",
        ".bmp",
        ".gif",
        ".webp",
        ".tif",
        ".tiff",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".ico",
    }
)


# The most the long side may exceed the short side by. Every later stage resizes the short side
# to the input size (224 px and more): a 400000x1 strip, only 0.4 megapixels and far below
# Pillow's bomb limit, would become 400000 * 224 x 224 pixels, tens of GB. 50x keeps the worst
# resized image (11200 x 224 at 224 px) near the size of an ordinary photo; real photos and
# scans, panoramas included, stay well inside it.
MAX_ASPECT_RATIO = 50


class UnusableImage(Exception):
    """An image file that cannot be used; `reason` is a short code for the data report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # RGB, EXIF orientation applied
    mode: str  # the file's own mode: L, LA, P, RGB, RGBA, CMYK, I;16, ...
    frames: int  # > 1 for animated images; frame 0 is used
    exif_error: bool  # EXIF orientation was unreadable; the image is used as stored


def decode_image(path: Path, min_side: int | None = None) -> Decoded:
    """Fully decode `path` (frame 0) to RGB; raise UnusableImage with a reason otherwise.

    `min_side`: the short side the caller will resize to. A JPEG at least twice that size is
    then decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling: all the data is still read
    and checked) as long as both sides stay >= min_side: much faster for large photos, with
    pixels close to a full decode and resize (bench/extract_speed.py measures both).
    """
    # Another library may have set Pillow's global LOAD_TRUNCATED_IMAGES, which pads truncated
    # files with grey instead of failing: refuse truncated data here regardless.
    allow_truncated, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        check_regular(path)
        return _decode(path, min_side, str(path))
    except UnusableImage as error:
        if error.reason == "unreadable" and path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise UnusableImage("not_image", error.detail) from error
        raise
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = allow_truncated


def decode_bytes(data: bytes, name: str, min_side: int | None = None) -> Decoded:
    """decode_image for an image held in memory (an upload to `headstart serve`), with the
    same checks; `name` only labels the warnings."""
    allow_truncated, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        if not data:
            raise UnusableImage("empty", "no bytes")
        return _decode(io.BytesIO(data), min_side, name)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = allow_truncated


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def check_regular(path: Path) -> None:
    """Refuse, without opening it, anything but a regular file (links followed): opening a FIFO
    blocks until something writes to it, a device may never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise UnusableImage("unreadable", f"{type(error).__name__}: {error}") from error
    if not stat.S_ISREG(mode):
        raise UnusableImage("not_regular", f"{_file_kind(mode)}, not a regular file")


def _check_aspect(image: Image.Image) -> None:
    width, height = image.size
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise UnusableImage(
            "extreme_aspect",
            f"{width}x{height} pixels: the long side is more than {MAX_ASPECT_RATIO}x the "
            "short side, too extreme to resize; crop it",
        )


def _decode(path: Path | io.BytesIO, min_side: int | None, name: str) -> Decoded:
    with warnings.catch_warnings():
        # Above Image.MAX_IMAGE_PIXELS (Pillow's ~89 megapixels) Pillow only warns until 2x;
        # refuse both alike.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                _check_aspect(image)  # from the header: before any pixel is decoded
                mode = image.mode
                frames = int(getattr(image, "n_frames", 1))
                if min_side is not None and image.format == "JPEG":
                    image.draft("RGB", (min_side, min_side))  # a no-op below 2x min_side
                image.load()  # decodes the pixels: truncated data fails here
                oriented, exif_error = _apply_exif_orientation(image, name)
                return Decoded(to_rgb(oriented), mode, frames, exif_error)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise UnusableImage("too_large", str(error)) from error
        except UnidentifiedImageError as error:
            raise UnusableImage("unreadable", "not a recognised image format") from error
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            reason = "truncated" if "truncated" in str(error).lower() else "unreadable"
            raise UnusableImage(reason, f"{type(error).__name__}: {error}") from error


def _apply_exif_orientation(image: Image.Image, name: str) -> tuple[Image.Image, bool]:
    try:
        return ImageOps.exif_transpose(image), False
    except Exception as error:  # malformed EXIF takes many forms; counted in the data report
        log.warning(
            "%s: unreadable EXIF orientation (%s); using the image as stored",
            printable(name),
            printable(str(error)),
        )
        return image, True


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB without clipping, hidden colours or lost transparency."""
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit (or 32-bit integer) grey: scale to 8 bits instead of clipping at 255.
        values = np.asarray(image).astype(np.int64)
        if image.mode == "I" and values.max(initial=0) <= 255:
            grey = values  # an 8-bit image stored as 32-bit integers
        else:
            grey = values >> 8
        return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.max(initial=0.0) <= 1.0:
            values = values * 255.0  # floats in [0, 1]
        return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8)).convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        # Composite on white: fully transparent pixels become white, whatever colour they hold.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: Path, min_side: int | None = None) -> Image.Image:
    """The RGB pixels of an image file (frame 0, EXIF orientation applied); see decode_image
    for `min_side`."""
    return decode_image(path, min_side).image
