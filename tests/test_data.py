"""Indexing, skipping and splitting an ImageFolder; decoding; the built-in digits."""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headstart import folders, loaders, transforms
from headstart.builtin import write_digits
from headstart.folders import index_image_folder
from headstart.images import load_rgb
from headstart.index import Images, prepare_index
from headstart.splits import assign_splits
from headstart.transforms import choose_image_size

SEED = 42


def _index(root: Path):
    index = index_image_folder(root)
    return index.classes, index.samples, index.skipped


def _images_on_disk(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _images(samples) -> Images:
    """Indexed samples as the loaders take them (all in train; labels by sorted class name)."""
    classes = sorted({s.label for s in samples})
    return Images(
        [s.path for s in samples],
        np.array([classes.index(s.label) for s in samples], dtype=np.int64),
        np.zeros(len(samples), dtype=np.int8),
        np.array([s.sha256 for s in samples], dtype="S64"),
    )


def _splits(root: Path, seed: int = SEED) -> dict[str, str]:
    _, samples, _ = _index(root)
    split, conflicts = assign_splits(samples, 0.15, 0.15, seed)
    assert conflicts == []
    return split


# --------------------------------------------------------------------------------------------
# Indexing


def test_every_image_indexed_once(image_folder):
    classes, samples, skipped = _index(image_folder)
    assert classes == ["bird", "cat", "dog"]
    paths = [s.path for s in samples]
    assert len(paths) == len(set(paths)) == 36
    assert set(paths) == _images_on_disk(image_folder)
    assert skipped == []
    for sample in samples:
        assert sample.label == sample.path.split("/")[0]
        with Image.open(image_folder / sample.path) as image:
            assert (sample.width, sample.height) == image.size
    formats = Counter(Path(s.path).suffix for s in samples)
    assert formats[".png"] > 0 and formats[".jpg"] > 0


def test_images_in_class_subfolders_belong_to_the_class(image_folder, make_image):
    make_image(image_folder / "cat" / "indoor" / "deep" / "extra.png", "cat", seed=7)
    _, samples, _ = _index(image_folder)
    by_path = {s.path: s.label for s in samples}
    assert by_path["cat/indoor/deep/extra.png"] == "cat"


def test_hidden_entries_are_neither_classes_nor_samples(image_folder, make_image):
    (image_folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (image_folder / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    # AppleDouble and notebook checkpoints hold valid images: only their names exclude them.
    make_image(image_folder / "cat" / "._x.jpg", "cat", seed=1)
    make_image(image_folder / ".ipynb_checkpoints" / "a.png", "cat", seed=2)
    make_image(image_folder / "dog" / ".ipynb_checkpoints" / "b.png", "dog", seed=3)
    make_image(image_folder / "__MACOSX" / "c.png", "dog", seed=4)

    classes, samples, skipped = _index(image_folder)
    assert classes == ["bird", "cat", "dog"]
    paths = {s.path for s in samples}
    assert len(paths) == 36
    for path in paths:
        assert ".DS_Store" not in path
        assert "._x.jpg" not in path
        assert ".ipynb_checkpoints" not in path
        assert "__MACOSX" not in path
    # Nothing vanishes: each hidden file is reported as skipped.
    assert {s.path: s.reason for s in skipped} == {
        ".DS_Store": "hidden",
        "cat/.DS_Store": "hidden",
        "cat/._x.jpg": "hidden",
        ".ipynb_checkpoints/a.png": "hidden",
        "dog/.ipynb_checkpoints/b.png": "hidden",
        "__MACOSX/c.png": "hidden",
    }


def test_unusable_files_are_skipped_with_a_reason(image_folder):
    (image_folder / "cat" / "x.jpg").write_text("this is not a JPEG\n", encoding="utf-8")
    (image_folder / "cat" / "notes.txt").write_text("hello\n", encoding="utf-8")
    (image_folder / "readme.md").write_text("root file\n", encoding="utf-8")
    png = (image_folder / "dog" / "dog_00.png").read_bytes()
    jpeg = (image_folder / "dog" / "dog_01.jpg").read_bytes()
    (image_folder / "dog" / "truncated.png").write_bytes(png[: len(png) // 2])
    (image_folder / "bird" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])

    _, samples, skipped = _index(image_folder)
    reasons = {s.path: s.reason for s in skipped}
    assert set(reasons) == {
        "cat/x.jpg",
        "cat/notes.txt",
        "readme.md",
        "dog/truncated.png",
        "bird/truncated.jpg",
    }
    assert reasons["cat/x.jpg"] == "unreadable"
    assert reasons["dog/truncated.png"] == "truncated"
    assert reasons["bird/truncated.jpg"] == "truncated"
    assert reasons["cat/notes.txt"] == "not_image"
    assert reasons["readme.md"] == "root_file"
    assert {s.path for s in samples}.isdisjoint(reasons)
    assert len(samples) == 36


def test_prepare_index_reports_skipped_files(image_folder):
    (image_folder / "cat" / "x.jpg").write_text("not an image", encoding="utf-8")
    _, rows, report = prepare_index(image_folder, 0.15, 0.15, SEED)
    assert report["num_skipped"] == 1
    assert report["skipped"][0]["path"] == "cat/x.jpg"
    assert report["skipped"][0]["reason"] == "unreadable"
    assert "not a recognised image format" in report["skipped"][0]["detail"]
    assert report["skipped_by_reason"] == {"unreadable": 1}
    assert "unreadable" in report["skip_reasons"]
    assert report["num_images"] == len(rows) == 36
    assert all(row[0] != "cat/x.jpg" for row in rows)


def test_prepare_index_report_counts(image_folder):
    classes, rows, report = prepare_index(image_folder, 0.15, 0.15, SEED)
    assert classes == ["bird", "cat", "dog"]
    assert report["num_classes"] == 3
    counted = Counter((row[1], row[2]) for row in rows)
    for label in classes:
        for split in ("train", "val", "test"):
            assert report["counts"][label][split] == counted[(label, split)]
    assert sum(report["splits"].values()) == len(rows)
    assert report["image_short_side"] == {"min": 16, "median": 16.0, "max": 24}


def test_prepare_states_the_imbalance_and_warns_naming_the_params(image_folder, caplog):
    """Images per class and largest:smallest in the report; above 5:1 the summary warns and
    names head.class_weight and finetune.class_weight."""
    import logging

    from headstart.index import summary

    _, _, report = prepare_index(image_folder, 0.15, 0.15, SEED)
    assert report["images_per_class"] == {"bird": 12, "cat": 12, "dog": 12}
    assert report["imbalance_ratio"] == 1.0
    caplog.set_level(logging.INFO)
    summary(report)
    assert "skewed classes" not in caplog.text

    for extra in range(60):  # bird: 72 images against 12
        shutil.copy(next(image_folder.glob("bird/*.png")), image_folder / "bird" / f"x{extra}.png")
        image = np.asarray(Image.open(image_folder / "bird" / f"x{extra}.png")).copy()
        image[0, 0] = extra  # distinct bytes: not exact copies
        Image.fromarray(image).save(image_folder / "bird" / f"x{extra}.png")
    _, _, report = prepare_index(image_folder, 0.15, 0.15, SEED)
    assert report["images_per_class"]["bird"] == 72
    assert report["imbalance_ratio"] == 6.0
    caplog.clear()
    summary(report)
    warning = next(r.getMessage() for r in caplog.records if "skewed classes" in r.getMessage())
    assert "bird has 72 images, cat 12 (6.0:1)" in warning
    assert "head.class_weight: balanced" in warning and "finetune.class_weight" in warning


def test_missing_dir_names_the_path(tmp_path):
    missing = tmp_path / "no_such_images"
    with pytest.raises(FileNotFoundError, match="no_such_images"):
        index_image_folder(missing)


def test_single_class_names_the_path(tmp_path, make_image):
    root = tmp_path / "only_cats"
    for index in range(5):
        make_image(root / "cat" / f"{index}.png", "cat", seed=index)
    with pytest.raises(ValueError, match="only_cats"):
        index_image_folder(root)


def test_empty_folder_names_the_path(tmp_path):
    root = tmp_path / "empty_root"
    root.mkdir()
    with pytest.raises(ValueError, match="empty_root"):
        index_image_folder(root)


def test_class_without_usable_images(image_folder):
    (image_folder / "fish").mkdir()
    (image_folder / "fish" / "fish.jpg").write_text("not an image", encoding="utf-8")
    with pytest.raises(ValueError, match="fish"):
        prepare_index(image_folder, 0.15, 0.15, SEED)


# --------------------------------------------------------------------------------------------
# Splits


def test_every_class_has_train_val_and_test(image_folder):
    split = _splits(image_folder)
    assert set(split) == _images_on_disk(image_folder)
    for label in ("bird", "cat", "dog"):
        present = {name for path, name in split.items() if path.startswith(f"{label}/")}
        assert present == {"train", "val", "test"}, label
    # Mostly train: the fractions are 0.15 + 0.15.
    assert Counter(split.values())["train"] > len(split) / 2


def test_same_seed_same_split_other_seed_other_split(image_folder):
    first = _splits(image_folder, seed=SEED)
    assert _splits(image_folder, seed=SEED) == first
    assert _splits(image_folder, seed=SEED + 1) != first


class _Listing(list):
    """What os.scandir returns, in a chosen order: iterable and a context manager."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False


def test_split_ignores_listing_order(image_folder, monkeypatch):
    expected_classes, expected_rows, expected_report = prepare_index(image_folder, 0.15, 0.15, SEED)
    real_scandir = os.scandir
    calls = []

    def reversed_scandir(path="."):
        calls.append(path)
        with real_scandir(path) as entries:
            return _Listing(sorted(entries, key=lambda e: e.name, reverse=True))

    monkeypatch.setattr(folders.os, "scandir", reversed_scandir)
    classes, rows, report = prepare_index(image_folder, 0.15, 0.15, SEED)
    assert calls, "the patched listing was not used"
    assert classes == expected_classes
    assert sorted(rows) == sorted(expected_rows)
    assert report["counts"] == expected_report["counts"]


def test_identical_bytes_within_a_class_share_a_split(image_folder):
    for original in sorted((image_folder / "cat").iterdir()):
        copy_dir = image_folder / "cat" / "copies"
        copy_dir.mkdir(exist_ok=True)
        shutil.copy(original, copy_dir / f"copy_{original.name}")
    split = _splits(image_folder)
    copies = [p for p in split if p.startswith("cat/copies/")]
    assert len(copies) == 12
    for copy in copies:
        original = "cat/" + copy.split("/")[-1].removeprefix("copy_")
        assert split[copy] == split[original], copy
    # Copies add no new groups: the originals keep their splits.
    assert {p: s for p, s in split.items() if p not in copies} == _splits_without_copies(
        image_folder
    )


def _splits_without_copies(root: Path) -> dict[str, str]:
    _, samples, _ = _index(root)
    originals = [s for s in samples if "/copies/" not in s.path]
    split, _ = assign_splits(originals, 0.15, 0.15, SEED)
    return split


def test_same_bytes_under_two_classes_are_reported(image_folder):
    shutil.copy(image_folder / "cat" / "cat_03.jpg", image_folder / "dog" / "looks_like_cat.jpg")
    _, samples, _ = _index(image_folder)
    split, conflicts = assign_splits(samples, 0.15, 0.15, SEED)
    assert {c.path for c in conflicts} == {"cat/cat_03.jpg", "dog/looks_like_cat.jpg"}
    for conflict in conflicts:
        assert conflict.reason == "conflicting_label"
        assert "cat" in conflict.detail and "dog" in conflict.detail
        assert conflict.path not in split

    _, rows, report = prepare_index(image_folder, 0.15, 0.15, SEED)
    assert {row[0] for row in rows}.isdisjoint({"cat/cat_03.jpg", "dog/looks_like_cat.jpg"})
    assert {s["path"] for s in report["skipped"]} == {"cat/cat_03.jpg", "dog/looks_like_cat.jpg"}


def test_adding_images_does_not_move_existing_ones(image_folder, make_image):
    before = _splits(image_folder)
    for class_index, label in enumerate(("bird", "cat", "dog")):
        make_image(image_folder / label / "new.png", label, seed=9000 + class_index)
    after = _splits(image_folder)
    assert set(after) == set(before) | {"bird/new.png", "cat/new.png", "dog/new.png"}
    moved = {p: (before[p], after[p]) for p in before if before[p] != after[p]}
    assert moved == {}


def test_tiny_class_still_gets_every_split(image_folder, make_image):
    for index in range(3):
        make_image(image_folder / "fox" / f"fox_{index}.png", "fox", seed=5000 + index)
    split = _splits(image_folder)
    fox = sorted(name for path, name in split.items() if path.startswith("fox/"))
    assert fox == ["test", "train", "val"]


def test_class_too_small_to_split_names_it(image_folder, make_image):
    for index in range(2):
        make_image(image_folder / "fox" / f"fox_{index}.png", "fox", seed=5000 + index)
    _, samples, _ = _index(image_folder)
    with pytest.raises(ValueError, match="'fox'"):
        assign_splits(samples, 0.15, 0.15, SEED)


# --------------------------------------------------------------------------------------------
# Decoding, image size, built-in data


def test_choose_image_size():
    assert choose_image_size(8, 224) == 96
    assert choose_image_size(500, 224) == 224
    assert choose_image_size(30, 224) == 128  # 4 x 30 = 120, rounded up to 128
    assert choose_image_size(500, 260) == 260


def test_load_rgb_composites_transparency_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # fully transparent red
    rgba[0, 1] = (0, 0, 255, 255)  # opaque blue
    rgba[1, :] = (0, 255, 0, 255)  # opaque green
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    image = load_rgb(path)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (0, 0, 255)
    assert image.getpixel((0, 1)) == (0, 255, 0)


def test_load_rgb_greyscale_becomes_three_channels(tmp_path, make_image):
    path = make_image(tmp_path / "grey.jpg", "cat", seed=0, size=(16, 20), mode="L")
    with Image.open(path) as raw:
        assert raw.mode == "L"
    image = load_rgb(path)
    assert image.mode == "RGB"
    assert image.size == (16, 20)
    pixels = np.asarray(image)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_write_digits(tmp_path):
    out = tmp_path / "digits"
    count = write_digits(out)
    files = sorted(out.rglob("*.png"))
    assert count == len(files) == 1797
    assert sorted(p.name for p in out.iterdir()) == [str(d) for d in range(10)]
    per_class = Counter(p.parent.name for p in files)
    assert min(per_class.values()) > 150
    with Image.open(files[0]) as image:
        assert image.size == (8, 8)
        assert image.mode == "L"


def test_index_entries_must_stay_inside_data_dir(tmp_path, image_folder):
    """A tampered or stale index.csv cannot make a stage read files outside data.dir."""
    from headstart.index import INDEX_HEADER, load_prepared
    from headstart.io import write_csv, write_json

    classes, rows, report = prepare_index(image_folder, 0.15, 0.15, SEED)
    prepared = tmp_path / "prepared"
    write_json(prepared / "classes.json", classes)
    write_json(prepared / "report.json", report)
    write_csv(prepared / "index.csv", INDEX_HEADER, rows)
    assert len(load_prepared(image_folder, prepared).images) == len(rows)

    secret = tmp_path / "secret.png"
    shutil.copy(image_folder / rows[0][0], secret)
    escaping = [["../secret.png", *rows[0][1:]]] + rows[1:]
    write_csv(prepared / "index.csv", INDEX_HEADER, escaping)
    with pytest.raises(ValueError, match=r"\.\./secret\.png.*leaves"):
        load_prepared(image_folder, prepared)

    # Through links inside data.dir: a folder link and a file link that point outside it.
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", image_folder / "linked")
    os.symlink(secret, image_folder / rows[0][1] / "linked.png")
    for path in ("linked/secret.png", f"{rows[0][1]}/linked.png", f"{rows[0][1]}/../.."):
        write_csv(prepared / "index.csv", INDEX_HEADER, [[path, *rows[0][1:]]] + rows[1:])
        with pytest.raises(ValueError, match=rf"{re.escape(path)}.*leaves"):
            load_prepared(image_folder, prepared)


def test_load_prepared_reads_the_index_by_column(tmp_path, image_folder):
    """The columns hold the index's rows in order: paths, class indices, split indices and
    digests; a wrong header, an unknown label or a malformed row is refused with the fix."""
    from headstart.folders import SPLITS
    from headstart.index import INDEX_HEADER, load_prepared
    from headstart.io import write_csv, write_json

    classes, rows, report = prepare_index(image_folder, 0.15, 0.15, SEED)
    prepared = tmp_path / "prepared"
    write_json(prepared / "classes.json", classes)
    write_json(prepared / "report.json", report)
    write_csv(prepared / "index.csv", INDEX_HEADER, rows)
    loaded = load_prepared(image_folder, prepared)
    images = loaded.images
    assert images.paths == [r[0] for r in rows]
    assert images.labels.dtype == np.int64 and images.splits.dtype == np.int8
    assert [classes[i] for i in images.labels] == [r[1] for r in rows]
    assert [SPLITS[i] for i in images.splits] == [r[2] for r in rows]
    assert [d.decode() for d in images.sha256] == [r[3] for r in rows]
    test = loaded.split("test")
    assert test.paths == [r[0] for r in rows if r[2] == "test"]
    assert [classes[i] for i in test.labels] == [r[1] for r in rows if r[2] == "test"]
    assert images.subset([2, 0]).paths == [rows[2][0], rows[0][0]]

    first, rest = rows[0], rows[1:]
    for header, lines, message in (
        (INDEX_HEADER[::-1], rows, r"index\.csv: header .* rerun prepare \(dvc repro\)"),
        (INDEX_HEADER, [[first[0], "zebra", *first[2:]], *rest], r"\['zebra'\] are not in"),
        (INDEX_HEADER, [[*first[:2], "holdout", *first[3:]], *rest], r"line 2: .*holdout"),
        (INDEX_HEADER, [first[:4], *rest], r"line 2: .*rerun prepare"),
    ):
        write_csv(prepared / "index.csv", header, lines)
        with pytest.raises(ValueError, match=message):
            load_prepared(image_folder, prepared)


def test_batch_order_depends_on_the_generator_alone(image_folder):
    """Images from files through worker processes and cached tensors loaded in-process visit
    the samples in the same order, epoch after epoch, and leave torch's global random stream
    alone (dropout and stochastic depth draw from it during training)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    images = _images(folders.index_image_folder(image_folder).samples)
    transform = transforms.eval_transform(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    files = loaders.image_loader(
        image_folder,
        images,
        transform,
        decode_size=8,
        batch_size=5,
        num_workers=2,
        shuffle=True,
        generator=torch.Generator().manual_seed(3),
    )
    # Tensors that carry each sample's position, so the order can be compared.
    positions = TensorDataset(torch.arange(len(images)), torch.arange(len(images)))
    tensors = DataLoader(
        positions, **loaders.sampling(positions, 5, True, torch.Generator().manual_seed(3))
    )
    torch.manual_seed(0)
    expected_global = torch.rand(1)
    torch.manual_seed(0)
    from_files, from_tensors = [], []
    for _ in range(3):
        labels = torch.cat([labels for _, labels in files])
        assert labels.dtype == torch.int64
        from_files.append(labels.tolist())
        from_tensors.append([int(images.labels[i]) for i in torch.cat([i for i, _ in tensors])])
    del files
    assert torch.rand(1) == expected_global  # nothing drew from the global generator
    assert from_files == from_tensors
    assert from_files[0] != from_files[1]  # a new permutation each epoch
    assert from_files[0] != sorted(from_files[0])  # shuffled


@pytest.mark.parametrize("augment", ["light", "photo", "strong"])
def test_augmentation_does_not_depend_on_the_loader_workers(image_folder, augment):
    """Each image's augmentation comes from its own seed (SeededOrder): the same tensors with
    0 or 2 worker processes, for every policy."""
    import torch

    images = _images(folders.index_image_folder(image_folder).samples)
    transform = transforms.train_transform(augment, size=16, mean=(0.5,) * 3, std=(0.5,) * 3)

    def epochs(num_workers: int) -> list[torch.Tensor]:
        loader = loaders.image_loader(
            image_folder,
            images,
            transform,
            decode_size=16,
            batch_size=5,
            num_workers=num_workers,
            shuffle=True,
            generator=torch.Generator().manual_seed(3),
        )
        return [torch.cat([images for images, _ in loader]) for _ in range(2)]

    in_process, workers = epochs(0), epochs(2)
    assert all(torch.equal(a, b) for a, b in zip(in_process, workers, strict=True))
    # The seed decides the draw: the same seed, the same image; another seed, another one.
    dataset = loaders.ImageDataset(image_folder, images.paths[:1], images.labels[:1], transform)
    assert type(dataset[0][1]) is int
    assert torch.equal(dataset[(0, 1)][0], dataset[(0, 1)][0])
    assert not torch.equal(dataset[(0, 1)][0], dataset[(0, 2)][0])


def test_loader_normalises_whole_batches_bit_for_bit(image_folder):
    """The eval transform's ToTensor + Normalize run on whole batches in the main process
    (workers send uint8 pixels): the same float32 values, bit for bit, as the per-image
    transform, with and without worker processes. An augmenting transform runs whole in the
    workers."""
    import torch

    images = _images(folders.index_image_folder(image_folder).samples)
    transform = transforms.eval_transform(24, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    dataset = loaders.ImageDataset(image_folder, images.paths, images.labels, transform)
    expected = torch.stack([dataset[i][0] for i in range(len(dataset))])
    for workers in (0, 2):
        loader = loaders.image_loader(
            image_folder,
            images,
            transform,
            decode_size=None,
            batch_size=7,
            num_workers=workers,
        )
        assert loader.dataset.transform.transforms[-1].__class__.__name__ == "PILToTensor"
        pixels = torch.cat([batch for batch, _ in loader])
        assert pixels.dtype == torch.float32
        assert torch.equal(pixels, expected)
    augmenting = transforms.train_transform("light", size=24, mean=(0.5,) * 3, std=(0.5,) * 3)
    loader = loaders.image_loader(
        image_folder, images, augmenting, decode_size=None, batch_size=7, num_workers=0
    )
    assert loader.dataset.transform is augmenting


def test_prepared_index_memory_per_image_is_small(tmp_path):
    """The index is held by column (a path string, an int64 label, an int8 split and 64 bytes
    of digest per image), never as a dict per row: extract's memory must not grow by
    hundreds of bytes per image (a list of dicts costs about 680 bytes per row)."""
    import hashlib
    import tracemalloc

    from headstart.folders import SPLITS
    from headstart.index import INDEX_HEADER, load_prepared
    from headstart.io import write_csv, write_json

    num_images, num_classes = 20_000, 10
    classes = [f"class_{c:02d}" for c in range(num_classes)]
    prepared = tmp_path / "prepared"
    write_json(prepared / "classes.json", classes)
    write_json(prepared / "report.json", {"num_images": num_images})
    write_csv(
        prepared / "index.csv",
        INDEX_HEADER,
        [
            [
                f"{classes[i % num_classes]}/IMG_20240101_{i:06d}.jpg",
                classes[i % num_classes],
                SPLITS[i % 3],
                hashlib.sha256(str(i).encode()).hexdigest(),
                "4032",
                "3024",
            ]
            for i in range(num_images)
        ],
    )
    root = tmp_path / "data"  # the check does not open the images: none need exist
    root.mkdir()

    tracemalloc.start()
    try:
        loaded = load_prepared(root, prepared)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(loaded.images) == num_images
    assert current / num_images < 250, f"{current / num_images:.0f} bytes per image held"
    assert peak / num_images < 250, f"{peak / num_images:.0f} bytes per image at the peak"
