"""Pictures for people: the confusion matrix and the worst mistakes, drawn with Pillow.

DVC shows PNG files declared under `plots:` as images (`dvc plots show`, `dvc plots diff`), with
no JavaScript from the web. The files are byte-identical for the same inputs: Pillow writes no
time or software chunk into a PNG unless asked, and the font is the one bundled with Pillow.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
GRID = (200, 200, 200)
WRONG = (190, 30, 30)
# Cells shade from white to this blue with the share of the actual class (row-normalised).
FULL = np.array((8, 69, 148), dtype=np.float64)
MAX_LABEL = 14  # characters of a class name shown; longer names are cut with "…"


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _short(name: str, limit: int = MAX_LABEL) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # no pnginfo: nothing that changes between runs
    return buffer.getvalue()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> float:
    return draw.textlength(text, font=font)


def confusion_png(counts: np.ndarray, classes: list[str], title: str) -> bytes:
    """A confusion matrix: rows actual, columns predicted; each cell shows its count and is
    shaded by its share of the actual class (so rare classes are as visible as common ones)."""
    n = len(classes)
    font, small, bold = _font(13), _font(10), _font(15)
    labels = [_short(c) for c in classes]
    cell = max(34, min(64, 640 // max(n, 1)))
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = int(max(_text_width(scratch, t, font) for t in labels)) + 12
    left = label_width + 24  # room for the rotated "actual" caption
    top = 40 + label_width  # title, then the column labels written upwards
    width, height = left + n * cell + 20, top + n * cell + 36
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill=INK, font=bold)

    totals = counts.sum(axis=1, keepdims=True).clip(min=1)
    shares = counts / totals  # (n, n) row-normalised
    for a in range(n):
        for p in range(n):
            x, y = left + p * cell, top + a * cell
            colour = tuple(int(round(c)) for c in 255 - shares[a, p] * (255 - FULL))
            draw.rectangle((x, y, x + cell, y + cell), fill=colour, outline=GRID)
            if counts[a, p]:
                ink = BACKGROUND if shares[a, p] > 0.5 else (WRONG if a != p else INK)
                text = str(int(counts[a, p]))
                draw.text((x + cell / 2, y + cell / 2), text, fill=ink, font=font, anchor="mm")
    for i, name in enumerate(labels):
        y = top + i * cell + cell / 2
        draw.text((left - 6, y), name, fill=INK, font=font, anchor="rm")
        # Column labels: drawn on their own strip, then rotated to read bottom-up.
        strip = Image.new("RGB", (label_width, cell), BACKGROUND)
        ImageDraw.Draw(strip).text((4, cell / 2), name, fill=INK, font=font, anchor="lm")
        image.paste(strip.rotate(90, expand=True), (left + i * cell, top - label_width - 2))
    draw.text((left + n * cell / 2, height - 18), "predicted", fill=INK, font=small, anchor="mm")
    caption = Image.new("RGB", (n * cell, 14), BACKGROUND)
    ImageDraw.Draw(caption).text((n * cell / 2, 7), "actual", fill=INK, font=small, anchor="mm")
    image.paste(caption.rotate(90, expand=True), (4, top))
    return _png(image)


def _tile(image: Image.Image, size: int) -> Image.Image:
    """Fit `image` in size x size, keeping its aspect ratio; small images are enlarged with
    nearest-neighbour so their pixels stay visible (an 8x8 digit becomes blocks, not a blur)."""
    scale = size / max(image.size)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BICUBIC
    resized = image.convert("RGB").resize(new, resample)
    tile = Image.new("RGB", (size, size), BACKGROUND)
    tile.paste(resized, ((size - new[0]) // 2, (size - new[1]) // 2))
    return tile


def image_grid_png(
    images: list[Image.Image],
    captions: list[list[str]],
    title: str,
    columns: int = 4,
    size: int = 112,
    empty: str = "none: every test image was classified correctly",
) -> bytes:
    """Images in a grid, each with caption lines under it (first line in red: the mistake).
    With no images, a picture that says `empty` (the output file always exists)."""
    font, bold = _font(12), _font(15)
    lines = max((len(c) for c in captions), default=0)
    pad, line_height = 8, 15
    columns = max(1, min(columns, len(images))) if images else 1
    rows = (len(images) + columns - 1) // columns
    tile_w, tile_h = size + 2 * pad, size + pad + lines * line_height + pad
    width = max(columns * tile_w + 2 * pad, 360)
    height = 40 + max(rows, 1) * tile_h + pad
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((pad + 2, 8), title, fill=INK, font=bold)
    if not images:
        draw.text((pad + 2, 48), empty, fill=INK, font=font)
    for k, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = pad + (k % columns) * tile_w + pad, 40 + (k // columns) * tile_h
        sheet.paste(_tile(image, size), (x, y))
        draw.rectangle((x - 1, y - 1, x + size, y + size), outline=GRID)
        for j, text in enumerate(caption):
            draw.text(
                (x, y + size + 4 + j * line_height),
                _short(text, 20),
                fill=WRONG if j == 0 else INK,
                font=font,
            )
    return _png(sheet)
