"""Decoding any image file to correct RGB, or refusing it with a reason.

Every file is a few pixels made here with numpy/PIL; the expected pixels are chosen so that the
usual Pillow shortcuts (`convert("RGB")`, `LOAD_TRUNCATED_IMAGES`, ignoring EXIF) give a
different answer.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from headstart import images
from headstart.folders import index_image_folder
from headstart.images import UnusableImage, decode_image, load_rgb, to_rgb
from headstart.index import Images
from headstart.loaders import image_loader
from headstart.transforms import eval_transform

WHITE = (255, 255, 255)
RED = (255, 0, 0)
BLUE = (0, 0, 255)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def write_bilevel_png(path: Path, side: int) -> Path:
    """A valid black 1-bit PNG of side x side pixels, written row by row.

    At side=20000 that is 400 megapixels in about 50 KB, without the 400 MB that
    `Image.new("1", (20000, 20000))` would allocate to make it.
    """
    row = bytes(1 + (side + 7) // 8)  # filter byte 0, then `side` bits of black
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", pixels)
        + _png_chunk(b"IEND", b"")
    )
    return path


def noisy_rgb(size: tuple[int, int], seed: int = 0) -> Image.Image:
    width, height = size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _palette(*colours: tuple[int, int, int]) -> list[int]:
    flat = [value for colour in colours for value in colour]
    return flat + [0] * (768 - len(flat))


# --------------------------------------------------------------------------------------------
# Modes


def _mode_L():
    image = Image.new("L", (5, 3), 77)
    image.putpixel((1, 0), 200)
    return image, {}, ".png", {(0, 0): (77, 77, 77), (1, 0): (200, 200, 200)}


def _mode_LA():
    image = Image.new("LA", (5, 3), (0, 0))  # fully transparent black
    image.putpixel((1, 0), (100, 255))  # opaque grey
    return image, {}, ".png", {(0, 0): WHITE, (1, 0): (100, 100, 100)}


def _mode_P():
    image = Image.new("P", (5, 3), 0)
    image.putpalette(_palette((10, 20, 30), (200, 100, 50)))
    image.putpixel((1, 0), 1)
    return image, {}, ".png", {(0, 0): (10, 20, 30), (1, 0): (200, 100, 50)}


def _mode_P_transparent():
    image = Image.new("P", (5, 3), 0)
    image.putpalette(_palette(RED, BLUE))  # index 0, red, is the transparent one (tRNS)
    image.putpixel((1, 0), 1)
    return image, {"transparency": 0}, ".png", {(0, 0): WHITE, (1, 0): BLUE}


def _mode_RGBA():
    image = Image.new("RGBA", (5, 3), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((1, 0), (0, 0, 255, 255))
    return image, {}, ".png", {(0, 0): WHITE, (1, 0): BLUE}


def _mode_CMYK():
    image = Image.new("CMYK", (5, 3), (0, 0, 0, 0))  # no ink: white
    image.putpixel((1, 0), (0, 255, 255, 0))  # magenta + yellow: red
    return image, {}, ".tif", {(0, 0): WHITE, (1, 0): RED}


def _mode_1():
    image = Image.new("1", (5, 3), 1)
    image.putpixel((1, 0), 0)
    return image, {}, ".png", {(0, 0): WHITE, (1, 0): (0, 0, 0)}


@pytest.mark.parametrize(
    ("mode", "build"),
    [
        ("L", _mode_L),
        ("LA", _mode_LA),
        ("P", _mode_P),
        ("P", _mode_P_transparent),
        ("RGBA", _mode_RGBA),
        ("CMYK", _mode_CMYK),
        ("1", _mode_1),
    ],
    ids=["L", "LA", "P", "P+tRNS", "RGBA", "CMYK", "1"],
)
def test_every_mode_decodes_to_rgb_with_the_right_pixels(tmp_path, mode, build):
    image, save_options, suffix, expected_pixels = build()
    path = tmp_path / f"image{suffix}"
    image.save(path, **save_options)
    with Image.open(path) as stored:
        assert stored.mode == mode  # the file really holds this mode
        if save_options:
            assert "transparency" in stored.info

    decoded = decode_image(path)
    assert decoded.mode == mode
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (5, 3)
    assert np.asarray(decoded.image).shape == (3, 5, 3)  # (H, W, RGB)
    assert (decoded.frames, decoded.exif_error) == (1, False)
    for position, colour in expected_pixels.items():
        assert decoded.image.getpixel(position) == colour, position


def test_half_transparent_pixel_is_blended_with_white(tmp_path):
    path = tmp_path / "half.png"
    Image.new("RGBA", (2, 2), (255, 0, 0, 128)).save(path)
    red, green, blue = load_rgb(path).getpixel((0, 0))
    # 128/255 red over white: (255, 127, 127). Dropping alpha would give (255, 0, 0).
    assert red == 255
    assert abs(green - 127) <= 1 and abs(blue - 127) <= 1


def test_transparent_pixels_do_not_keep_their_hidden_colour_in_to_rgb():
    rgba = Image.new("RGBA", (3, 3), (0, 200, 0, 0))  # invisible green
    assert rgba.convert("RGB").getpixel((0, 0)) == (0, 200, 0)  # the pitfall
    assert to_rgb(rgba).getpixel((0, 0)) == WHITE


# --------------------------------------------------------------------------------------------
# 16-bit and 32-bit integer greys


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 255, 256, 1000, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as stored:
        assert stored.mode == "I;16"

    decoded = decode_image(path)
    assert decoded.mode == "I;16"
    assert decoded.image.mode == "RGB"
    grey = np.asarray(decoded.image)[0, :, 0]
    # value >> 8: 1000 -> 3, not the 255 that convert("RGB") clips it to.
    assert grey.tolist() == [0, 0, 1, 1000 >> 8, 255]
    assert (np.asarray(decoded.image) == grey[None, :, None]).all()  # grey in all channels


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0, 7, 200, 255], [0, 7, 200, 255]),  # 8-bit values stored as 32-bit integers: kept
        ([0, 255, 1000, 65535], [0, 0, 3, 255]),  # 16-bit values in a 32-bit image: scaled
    ],
    ids=["8-bit-range", "16-bit-range"],
)
def test_32_bit_integer_image(tmp_path, values, expected):
    path = tmp_path / "wide.tif"
    Image.fromarray(np.array([values], dtype=np.int32)).save(path)
    with Image.open(path) as stored:
        assert stored.mode == "I"

    decoded = decode_image(path)
    assert decoded.mode == "I"
    assert np.asarray(decoded.image)[0, :, 1].tolist() == expected


def test_float_image_in_unit_range_is_scaled_to_8_bits():
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert np.asarray(to_rgb(image))[0, :, 2].tolist() == [0, 128, 255]


# --------------------------------------------------------------------------------------------
# EXIF orientation


def _portrait_stored_as_landscape(path: Path) -> Path:
    """40x20 blue JPEG with a red top-left 10x10 block, tagged Orientation=6 (turn 90° CW)."""
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif, quality=95)
    return path


def _is_red(pixel) -> bool:
    red, green, blue = pixel
    return red > 200 and green < 60 and blue < 60


def test_exif_orientation_is_applied(tmp_path):
    path = _portrait_stored_as_landscape(tmp_path / "rotated.jpg")
    with Image.open(path) as stored:
        assert stored.size == (40, 20)

    decoded = decode_image(path)
    assert decoded.image.size == (20, 40)
    assert decoded.exif_error is False
    # Turned clockwise, the stored top-left corner is now the top-right one.
    assert _is_red(decoded.image.getpixel((15, 5)))
    assert not _is_red(decoded.image.getpixel((5, 5)))
    assert not _is_red(decoded.image.getpixel((15, 35)))
    assert load_rgb(path).size == (20, 40)


def test_broken_exif_keeps_the_image_as_stored_and_warns(tmp_path, monkeypatch, caplog):
    path = _portrait_stored_as_landscape(tmp_path / "broken_exif.jpg")

    def broken(image, *args, **kwargs):
        raise ZeroDivisionError("division by zero in a rational EXIF value")

    monkeypatch.setattr(images.ImageOps, "exif_transpose", broken)
    caplog.set_level(logging.WARNING, logger="headstart.images")
    decoded = decode_image(path)

    assert decoded.exif_error is True
    assert decoded.image.size == (40, 20)  # as stored, not rotated
    assert decoded.image.mode == "RGB"
    assert _is_red(decoded.image.getpixel((5, 5)))
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert str(path) in warned[0].getMessage()


# --------------------------------------------------------------------------------------------
# Decompression bombs


def test_bilevel_png_writer_makes_a_real_image(tmp_path):
    # The bomb below is only meaningful if the hand-made PNG is valid: check a small one.
    path = write_bilevel_png(tmp_path / "small.png", 64)
    with Image.open(path) as image:
        image.load()
        assert (image.mode, image.size, image.getextrema()) == ("1", (64, 64), (0, 0))
    assert decode_image(path).image.getpixel((63, 63)) == (0, 0, 0)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = write_bilevel_png(tmp_path / "bomb.png", 20000)
    assert path.stat().st_size < 200_000  # small on disk ...
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(path) as image:
        assert (image.mode, image.size) == ("1", (20000, 20000))  # ... 400 megapixels inside
    monkeypatch.undo()

    with pytest.raises(UnusableImage) as caught:
        decode_image(path)
    assert caught.value.reason == "too_large"


@pytest.mark.parametrize(
    "side",
    [12, 16],  # 144 pixels: Pillow only warns (limit 100, error above 200); 256: Pillow errors
    ids=["warning-range", "error-range"],
)
def test_above_the_pixel_limit_is_too_large(tmp_path, monkeypatch, side):
    path = tmp_path / "big.png"
    noisy_rgb((side, side)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)

    with pytest.raises(UnusableImage) as caught:
        decode_image(path)
    assert caught.value.reason == "too_large"


def test_at_the_pixel_limit_decodes_and_the_warning_filter_does_not_leak(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    at_limit = tmp_path / "at_limit.png"
    noisy_rgb((10, 10)).save(at_limit)
    assert decode_image(at_limit).image.size == (10, 10)

    above = tmp_path / "above.png"
    noisy_rgb((12, 12)).save(above)
    with pytest.raises(UnusableImage):
        decode_image(above)
    # Outside decode_image, Pillow's warning is a warning again, not an error.
    with pytest.warns(Image.DecompressionBombWarning), Image.open(above):
        pass


# --------------------------------------------------------------------------------------------
# Animated, misnamed, truncated and unreadable files


def test_animated_gif_uses_frame_0(tmp_path):
    path = tmp_path / "animated.gif"
    frames = [Image.new("RGB", (6, 4), colour) for colour in (RED, (0, 255, 0), BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)

    decoded = decode_image(path)
    assert decoded.frames == 3
    assert decoded.image.size == (6, 4)
    assert (np.asarray(decoded.image) == RED).all()


def test_png_bytes_named_jpg_decode(tmp_path):
    original = noisy_rgb((7, 5), seed=3)
    path = tmp_path / "really_a_png.jpg"
    original.save(path, "PNG")
    decoded = decode_image(path)
    assert decoded.image.size == (7, 5)
    assert np.array_equal(np.asarray(decoded.image), np.asarray(original))  # lossless


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_file_is_refused_as_truncated(tmp_path, suffix):
    whole = tmp_path / f"whole{suffix}"
    noisy_rgb((64, 64), seed=1).save(whole)
    data = whole.read_bytes()
    path = tmp_path / f"half{suffix}"
    path.write_bytes(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False

    with pytest.raises(UnusableImage) as caught:
        decode_image(path)
    assert caught.value.reason == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.jpg", b""),
        ("text.jpg", b"this is not a JPEG\n"),
        ("TEXT.JPG", b"nor is this\n"),
        ("garbage.png", bytes(range(256))),
    ],
)
def test_unreadable_file_is_refused_as_unreadable(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UnusableImage) as caught:
        decode_image(path)
    assert caught.value.reason == "unreadable"
    assert caught.value.detail


# --------------------------------------------------------------------------------------------
# Loading in DataLoader workers


@pytest.mark.parametrize("damage", ["overwritten", "deleted"])
def test_loader_error_names_the_file_that_broke_after_indexing(tmp_path, damage):
    root = tmp_path / "images"
    for label_index, label in enumerate(("cat", "dog")):
        (root / label).mkdir(parents=True)
        for index in range(4):
            noisy_rgb((12, 12), seed=10 * label_index + index).save(root / label / f"{index}.png")
    samples = index_image_folder(root).samples
    broken = root / samples[5].path
    if damage == "overwritten":
        broken.write_bytes(b"no longer an image")
    else:
        broken.unlink()

    transform = eval_transform(12, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    indexed = Images(
        [s.path for s in samples],
        np.array([("cat", "dog").index(s.label) for s in samples], dtype=np.int64),
        np.zeros(len(samples), dtype=np.int8),
        np.array([s.sha256 for s in samples], dtype="S64"),
    )
    loader = image_loader(root, indexed, transform, decode_size=12, batch_size=2, num_workers=2)
    batches, message = [], None
    try:
        for images_batch, labels in loader:
            batches.append((images_batch.shape, labels.tolist()))
    except RuntimeError as error:
        message = str(error)
        # The re-raised error and its traceback form a reference cycle that holds the loader's
        # iterator; freed by the garbage collector instead, its workers take 10 s to stop.
        error.__traceback__ = None
    del loader  # stops the persistent workers
    assert message is not None, "the broken file went unnoticed"
    # The worker's traceback follows the headline; the headline itself names the file.
    assert str(broken) in message.strip().splitlines()[-1]
    # The files before it are fine: the two batches before the broken one arrived intact.
    assert batches == [(torch.Size([2, 3, 12, 12]), [0, 0])] * 2


def test_dataset_error_names_the_file_in_the_main_process(tmp_path):
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "bad.png").write_bytes(b"not a png")
    loader = image_loader(
        root,
        Images(["cat/bad.png"], np.zeros(1, np.int64), np.zeros(1, np.int8), np.zeros(1, "S64")),
        lambda x: x,
        decode_size=8,
        batch_size=1,
        num_workers=0,
    )
    with pytest.raises(RuntimeError) as caught:
        next(iter(loader))
    assert f"{root / 'cat' / 'bad.png'}: cannot decode or transform image" in str(caught.value)


@pytest.mark.parametrize("min_side", [96, 150, 224, 301])
def test_large_jpegs_decode_at_reduced_scale_never_below_min_side(tmp_path, min_side):
    """1/2, 1/4 or 1/8 scale while both sides stay >= min_side; close to a full decode."""
    path = tmp_path / "photo.jpg"
    pixels = np.asarray(noisy_rgb((40, 30), seed=3).resize((800, 600), Image.BICUBIC))
    Image.fromarray(pixels).save(path, quality=92)
    full = decode_image(path).image
    reduced = decode_image(path, min_side).image
    assert full.size == (800, 600)
    scale = {96: 4, 150: 4, 224: 2, 301: 1}[min_side]  # the largest that keeps 600 / s >= side
    assert reduced.size == (800 // scale, 600 // scale)
    assert min(reduced.size) >= min_side
    transform = eval_transform(min_side, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    difference = (transform(full) - transform(reduced)).abs().mean().item() * 0.5 * 255
    assert difference < 2.0  # mean absolute difference in 0-255 pixel levels


def test_reduced_scale_leaves_small_jpegs_and_pngs_alone(tmp_path):
    image = noisy_rgb((120, 90), seed=4)
    image.save(tmp_path / "small.jpg", quality=92)
    image.save(tmp_path / "large.png")
    assert decode_image(tmp_path / "small.jpg", 96).image.size == (120, 90)  # < 2x: full
    png = image.resize((800, 600))
    png.save(tmp_path / "large.png")
    assert decode_image(tmp_path / "large.png", 96).image.size == (800, 600)  # PNG: full
