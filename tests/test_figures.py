"""The PNG pictures: readable sizes, the same bytes for the same inputs, no metadata."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from headstart.figures import confusion_png, image_grid_png
from headstart.metrics import worst_misclassified


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_confusion_png_is_deterministic_and_grows_with_the_classes():
    counts = np.array([[5, 1, 0], [0, 4, 2], [1, 0, 6]])
    names = ["cat", "dog", "a very long class name indeed"]
    first = confusion_png(counts, names, "title")
    assert first == confusion_png(counts, names, "title")
    assert first != confusion_png(counts + np.eye(3, dtype=int), names, "title")
    small = _open(first)
    assert small.format == "PNG" and small.mode == "RGB"
    assert set(small.info) <= {"dpi"} and "dpi" not in small.info  # no text chunks, no time
    big = _open(confusion_png(np.eye(12, dtype=int), [str(i) for i in range(12)], "title"))
    assert big.width > small.width


def test_image_grid_png():
    images = [Image.new("L", (8, 8), 40 * i) for i in range(5)]
    captions = [[f"predicted {i}", "true 0", f"{i}.png"] for i in range(5)]
    data = image_grid_png(images, captions, "Mistakes", columns=4, size=64)
    assert data == image_grid_png(images, captions, "Mistakes", columns=4, size=64)
    grid = _open(data)
    assert grid.width >= 4 * 64 and grid.height >= 2 * 64  # 4 columns, 2 rows
    empty = _open(image_grid_png([], [], "Mistakes"))
    assert empty.width > 0 and empty.height > 0


def test_worst_misclassified_orders_by_confidence():
    probabilities = np.array(
        [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]]
    )  # predicted: 0, 1, 0, 1, 0
    labels = np.array([0, 0, 1, 0, 1])  # wrong: 1 (0.8), 2 (0.6), 3 (0.7), 4 (0.55)
    assert worst_misclassified(probabilities, labels) == [1, 3, 2, 4]
    assert worst_misclassified(probabilities, labels, top=2) == [1, 3]
    assert worst_misclassified(probabilities, probabilities.argmax(1)) == []
