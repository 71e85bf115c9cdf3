"""A zoo of odd and broken files next to good images, through the real `dvc repro`.

The run must complete; every good image must be in the index exactly once; every other file
must be in the data report with its reason. Links: `dvc add` itself refuses a dangling link
(naming it) and stores linked files as regular files, so only the folder loop survives into
the DVC-tracked data here; the other link cases are covered in test_folders.py.
"""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from test_e2e_dvc import FAST, make_repo, ran_stages, run

pytestmark = pytest.mark.e2e


def _noise(size=(32, 32), seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4}.get(mode, 0)
    shape = (size[1], size[0], channels) if channels else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def add_zoo(root) -> tuple[set[str], dict[str, str]]:
    """Write odd-but-good images and bad files under root; return (good paths, bad -> reason)."""
    good: set[str] = set()
    bad: dict[str, str] = {}

    def put(relative: str, data: bytes, reason: str | None) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if reason is None:
            good.add(relative)
        else:
            bad[relative] = reason

    def png(image: Image.Image, **options) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, "PNG", **options)
        return buffer.getvalue()

    # Odd but usable: every mode, 16-bit, EXIF rotation, animation, PNG named .jpg, sub-folder.
    put("cat/mode_l.png", png(_noise(seed=1).convert("L")), None)
    put("cat/mode_la.png", png(_noise(seed=2).convert("LA")), None)
    put("cat/mode_p.png", png(_noise(seed=3).convert("P")), None)
    palette = _noise(seed=4).convert("P")
    put("cat/mode_p_trns.png", png(palette, transparency=0), None)
    put("dog/mode_rgba.png", png(_noise(seed=5, mode="RGBA")), None)
    put("dog/mode_cmyk.jpg", _jpeg_bytes(_noise(seed=6, mode="CMYK")), None)
    deep = Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16))
    put("dog/mode_i16.png", png(deep), None)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    put("bird/rotated.jpg", _jpeg_bytes(_noise((40, 20), seed=7), exif=exif), None)
    frames = [_noise(seed=s).convert("P") for s in (8, 9, 10)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    put("bird/animated.gif", buffer.getvalue(), None)
    put("bird/png_named.jpg", png(_noise(seed=11)), None)
    put("bird/nested/deeper/inside.png", png(_noise(seed=12)), None)
    # The same bytes twice in one class: both kept, always in the same split.
    twin = png(_noise(seed=13))
    put("cat/twin_a.png", twin, None)
    put("cat/twin_b.png", twin, None)

    # Bad: each must be reported with this reason.
    whole = _jpeg_bytes(_noise((64, 64), seed=14))
    put("cat/truncated.jpg", whole[: len(whole) // 2], "truncated")
    put("cat/empty.jpg", b"", "unreadable")
    put("dog/text.jpg", b"this is not a picture\n", "unreadable")
    put("dog/notes.txt", b"labelling notes\n", "not_image")
    put("dog/._apple_double.jpg", b"\x00\x05\x16\x07AppleDouble", "hidden")
    put(".DS_Store", b"\x00\x00\x00\x01Bud1", "hidden")
    put("cat/Thumbs.db", b"thumbs", "hidden")
    put(".ipynb_checkpoints/cat/copy.png", png(_noise(seed=15)), "hidden")
    put("__MACOSX/dog/._x.png", b"junk", "hidden")
    put("README.txt", b"a file in the root\n", "root_file")
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, "PNG")  # ~50 KB, 400 megapixels
    put("bird/bomb.png", bomb.getvalue(), "too_large")
    clash = png(_noise(seed=16))
    put("cat/clash.png", clash, "conflicting_label")
    put("dog/clash.png", clash, "conflicting_label")
    return good, bad


def test_zoo_runs_through_dvc_repro(tmp_path, image_folder):
    originals = {
        p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*") if p.is_file()
    }
    good, bad = add_zoo(image_folder)
    good |= originals
    repo = make_repo(tmp_path, image_folder, FAST)
    # A folder link looping back to the root, in the workspace (`dvc add` does not record
    # folder links, so data/raw.dvc is unchanged by it).
    os.symlink("..", repo / "data" / "raw" / "cat" / "loop")
    bad["cat/loop"] = "link_loop"
    assert "up to date" in run(repo, "dvc", "status", "data/raw.dvc")

    # Up to evaluate, the last stage that reads the images. (Export reads only the model, and
    # digits, the built-in dataset, is not read when data.dir is set.)
    output = run(repo, "dvc", "repro", "evaluate")
    up_to_evaluate = {"prepare", "extract", "audit", "train_head", "finetune", "evaluate"}
    assert ran_stages(output) == up_to_evaluate, output

    with open(repo / "data" / "prepared" / "index.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    indexed = [row["path"] for row in rows]
    assert sorted(indexed) == sorted(good), set(indexed) ^ good  # each good image exactly once
    report = json.loads((repo / "data" / "prepared" / "report.json").read_text())
    reported = {entry["path"]: entry["reason"] for entry in report["skipped"]}
    assert reported == bad
    assert report["num_skipped"] == len(bad)
    twins = {row["split"] for row in rows if row["path"] in ("cat/twin_a.png", "cat/twin_b.png")}
    assert len(twins) == 1
    assert report["multi_frame"] == 1
    for mode in ("L", "LA", "P", "RGBA", "CMYK", "I;16"):
        assert report["image_modes"].get(mode), (mode, report["image_modes"])
    rotated = next(row for row in rows if row["path"] == "bird/rotated.jpg")
    assert (rotated["width"], rotated["height"]) == ("20", "40")  # EXIF applied
    data_metrics = json.loads((repo / "metrics" / "data.json").read_text())
    assert data_metrics["skipped"] == len(bad)
    assert data_metrics["images"] == len(good)
