"""prepare's near-copy grouping (data.near_copies, headstart.near_copies): files with other
bytes but the same perceptual hash share a split, as identical files do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from headstart.index import INDEX_HEADER, prepare_index
from headstart.io import write_csv


def _prepare(root: Path, work: Path, near_copies: str):
    _, rows, report = prepare_index(root, 0.15, 0.15, 42, near_copies)
    write_csv(work / "index.csv", INDEX_HEADER, rows)  # writable as prepare writes it
    return rows, report


def _smooth_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((64, 64), Image.Resampling.BICUBIC)


def test_near_copies_share_a_split_with_phash(tmp_path):
    """Copies with different bytes but the same perceptual hash (re-encoded losslessly, or
    resized where the hash survives: checked) land in their original's split, in its class or
    another, with data.near_copies phash; with off, they scatter."""
    from headstart.near_copies import perceptual_hash

    root = tmp_path / "images"
    pairs = []
    for seed in range(60):
        label = ("a", "b", "c")[seed % 3]
        image = _smooth_image(seed)
        (root / label).mkdir(parents=True, exist_ok=True)
        image.save(root / label / f"{seed:02d}.png")
        other = ("a", "b", "c")[(seed + seed // 3) % 3]  # every third copy in another class
        if seed % 2:
            copy, name = image, f"{other}/{seed:02d}_copy.bmp"  # same pixels, other bytes
        else:
            copy, name = (
                image.resize((48, 48), Image.Resampling.BICUBIC),
                f"{other}/{seed:02d}_48.png",
            )
            if perceptual_hash(copy) != perceptual_hash(image):
                continue  # pHash equality does not survive every resize (docs/audit.md)
        copy.save(root / name)
        pairs.append((f"{label}/{seed:02d}.png", name))
    assert len(pairs) >= 40  # 30 lossless copies and most of the resized ones
    assert any(a.split("/")[0] != b.split("/")[0] for a, b in pairs)

    def splits(near_copies: str) -> tuple[dict[str, str], dict]:
        rows, report = _prepare(root, tmp_path / near_copies, near_copies)
        return {row[0]: row[2] for row in rows}, report

    grouped, report = splits("phash")
    assert [p for p in pairs if grouped[p[0]] != grouped[p[1]]] == []
    assert report["near_copy_groups"] == len(pairs)
    assert report["near_copy_images"] == 2 * len(pairs)
    scattered, report = splits("off")
    assert sum(scattered[a] != scattered[b] for a, b in pairs) > 5
    assert report["near_copy_groups"] == 0


def test_digits_like_tiny_images_are_not_joined():
    """Distinct images that differ in a few pixels keep distinct hashes (on the 1,797 built-in
    digits no two share one: docs/audit.md), and a lossless re-encoding keeps its hash."""
    from headstart.near_copies import perceptual_hash

    rng = np.random.default_rng(0)
    hashes = set()
    for _ in range(50):
        pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
        image = Image.fromarray(pixels).convert("RGB")
        hashes.add(perceptual_hash(image))
        assert perceptual_hash(Image.fromarray(pixels.copy()).convert("RGB")) in hashes
    assert len(hashes) == 50
