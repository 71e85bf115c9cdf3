"""Walking an image folder: links, Unicode and case, stray files, pre-split layouts, and every
file on disk either indexed or skipped with a reason."""

from __future__ import annotations

import json
import os
import shutil
import unicodedata
from pathlib import Path

import pytest
from PIL import Image

from headstart import folders
from headstart.folders import SKIP_REASONS, index_image_folder
from headstart.images import load_rgb
from headstart.index import INDEX_HEADER, prepare_index
from headstart.io import read_csv, write_csv

SEED = 42
CAFE_NFC = unicodedata.normalize("NFC", "café")
CAFE_NFD = unicodedata.normalize("NFD", "café")
assert CAFE_NFC != CAFE_NFD


@pytest.fixture
def folder(tmp_path, make_image):
    """folder(root, {class: n}) writes n small distinct PNGs per class folder; returns root."""
    counter = iter(range(10_000))

    def write(root: Path, counts: dict[str, int]) -> Path:
        for label, count in counts.items():
            for index in range(count):
                # One pattern for every class: only the seeded noise differs, which is enough
                # to make every file's bytes (and so its content-hash split) distinct.
                make_image(root / label / f"{index}.png", "cat", seed=next(counter), size=(8, 8))
        return root

    return write


def _paths(index) -> list[str]:
    return [s.path for s in index.samples]


def _reasons(index) -> dict[str, str]:
    reasons = {}
    for skipped in index.skipped:
        assert skipped.path not in reasons, f"{skipped.path} reported twice"
        reasons[skipped.path] = skipped.reason
    return reasons


def _files_on_disk(root: Path) -> set[str]:
    """Every file below root, plus every link to a folder, without following any link."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False
        here = Path(dirpath)
        found.update((here / name).relative_to(root).as_posix() for name in filenames)
        found.update(
            (here / name).relative_to(root).as_posix()
            for name in dirnames
            if (here / name).is_symlink()
        )
    return found


# --------------------------------------------------------------------------------------------
# Symbolic links


@pytest.mark.parametrize(
    ("link", "target"),
    [
        ("cat/loop", "{root}"),  # absolute link to the data root
        ("cat/up", ".."),  # relative link to the data root
        ("cat/sub/back", ".."),  # link from a sub-folder to its class folder
        ("cat/sub/self", "."),  # link to the folder it is in
    ],
)
def test_link_loop_adds_nothing_and_is_reported(tmp_path, folder, make_image, link, target):
    root = folder(tmp_path / "images", {"cat": 3, "dog": 3})
    make_image(root / "cat" / "sub" / "deep.png", "cat", seed=99, size=(8, 8))
    before = _paths(index_image_folder(root))
    assert len(before) == 7

    os.symlink(target.format(root=root), root / link, target_is_directory=True)
    index = index_image_folder(root)
    assert _paths(index) == before
    assert _reasons(index) == {link: "link_loop"}


def test_links_out_of_the_root_are_skipped(tmp_path, folder, make_image):
    root = folder(tmp_path / "images", {"cat": 3, "dog": 3})
    outside = tmp_path / "elsewhere"
    secret = make_image(outside / "secret.png", "dog", seed=7, size=(8, 8))
    make_image(outside / "more" / "x.png", "dog", seed=8, size=(8, 8))
    os.symlink(secret, root / "cat" / "secret.png")  # a file outside
    os.symlink(outside / "more", root / "cat" / "more", target_is_directory=True)  # a folder
    os.symlink("../../elsewhere/secret.png", root / "dog" / "relative.png")  # relative path out

    index = index_image_folder(root)
    assert len(index.samples) == 6
    assert _reasons(index) == {
        "cat/secret.png": "link_outside",
        "cat/more": "link_outside",
        "dog/relative.png": "link_outside",
    }
    assert not any("elsewhere" in path or "secret" in path for path in _paths(index))


def test_dangling_links_are_skipped(tmp_path, folder):
    root = folder(tmp_path / "images", {"cat": 3, "dog": 3})
    os.symlink(tmp_path / "gone.png", root / "cat" / "gone.png")
    os.symlink(tmp_path / "gone_dir", root / "cat" / "gone_dir", target_is_directory=True)
    os.symlink(tmp_path / "gone.png", root / "stray.png")  # in the root, outside any class

    index = index_image_folder(root)
    assert len(index.samples) == 6
    assert _reasons(index) == {
        "cat/gone.png": "link_dangling",
        "cat/gone_dir": "link_dangling",
        "stray.png": "link_dangling",
    }
    detail = {s.path: s.detail for s in index.skipped}
    assert detail["cat/gone.png"] == str(tmp_path / "gone.png")


@pytest.mark.parametrize("alias", ["alias.png", "zz_alias.png"])  # sorting before and after
def test_link_to_a_file_in_the_root_is_a_duplicate(tmp_path, folder, make_image, alias):
    root = folder(tmp_path / "images", {"cat": 3, "dog": 3})
    make_image(root / "cat" / "real.png", "cat", seed=50, size=(8, 8))
    os.symlink("real.png", root / "cat" / alias)

    index = index_image_folder(root)
    assert "cat/real.png" in _paths(index)
    assert f"cat/{alias}" not in _paths(index)
    assert len(index.samples) == 7
    assert _reasons(index) == {f"cat/{alias}": "link_duplicate"}
    assert index.skipped[0].detail == "cat/real.png"


def test_link_to_another_class_folder_indexes_each_file_once_under_its_real_class(tmp_path, folder):
    root = folder(tmp_path / "images", {"cat": 3, "dog": 3})
    # "cat/dogs/..." sorts before "dog/...": the real files must still win.
    os.symlink("../dog", root / "cat" / "dogs", target_is_directory=True)

    index = index_image_folder(root)
    labels = {s.path: s.label for s in index.samples}
    assert labels == {
        **{f"cat/{i}.png": "cat" for i in range(3)},
        **{f"dog/{i}.png": "dog" for i in range(3)},
    }
    assert _reasons(index) == {f"cat/dogs/{i}.png": "link_duplicate" for i in range(3)}
    real = [os.path.realpath(root / path) for path in labels]
    assert len(real) == len(set(real))


@pytest.mark.parametrize(
    ("alias", "target"),
    [
        ("aardvark", "cat"),  # a second name for a class, sorting before it ...
        ("zebra", "cat"),  # ... and after it
        ("all", "."),  # a link to the data root itself, sorting before the classes ...
        ("zoo", "."),  # ... and after them
    ],
)
def test_top_level_link_never_displaces_the_real_files(tmp_path, folder, alias, target):
    root = folder(tmp_path / "images", {"cat": 3, "dog": 3})
    os.symlink(target, root / alias, target_is_directory=True)

    index = index_image_folder(root)
    # Real files first, whatever the link is called (folders.py: "a link to an indexed file is a
    # duplicate, not a sample"): each file is a sample once, at its own path, in its own class.
    labels = {s.path: s.label for s in index.samples}
    assert labels == {f"{label}/{i}.png": label for label in ("cat", "dog") for i in range(3)}
    reasons = _reasons(index)
    # A link where a class folder is expected is reported once, itself, and not followed.
    assert reasons == {alias: reasons[alias]}
    assert set(reasons.values()) <= {"link_duplicate", "link_loop"}


# --------------------------------------------------------------------------------------------
# Unicode and case


def test_nfc_and_nfd_spellings_of_one_class_are_refused(tmp_path, folder):
    root = folder(tmp_path / "images", {CAFE_NFC: 3, CAFE_NFD: 3, "dog": 3})
    assert len(os.listdir(root)) == 3  # this file system keeps both spellings apart

    with pytest.raises(ValueError) as caught:
        index_image_folder(root)
    message = str(caught.value)
    assert ascii(CAFE_NFC) in message and ascii(CAFE_NFD) in message
    assert "'dog'" not in message
    assert str(root) in message


def test_case_variants_of_one_class_are_refused(tmp_path, folder):
    root = folder(tmp_path / "images", {"Cat": 3, "cat": 3, "dog": 3})
    with pytest.raises(ValueError, match="case") as caught:
        index_image_folder(root)
    assert "'Cat'" in str(caught.value) and "'cat'" in str(caught.value)
    assert "'dog'" not in str(caught.value)


def test_nfd_class_name_becomes_nfc(tmp_path, folder):
    root = folder(tmp_path / "images", {CAFE_NFD: 4, "dog": 4})
    classes, rows, report = prepare_index(root, 0.15, 0.15, SEED)

    assert classes == [CAFE_NFC, "dog"]
    assert {row[1] for row in rows} == {CAFE_NFC, "dog"}
    assert set(report["counts"]) == {CAFE_NFC, "dog"}
    for path, label, *_ in rows:
        if label == CAFE_NFC:
            assert path.startswith(CAFE_NFD + "/")  # the path is the one on disk ...
            assert load_rgb(root / path).size == (8, 8)  # ... so it opens


def test_nfc_and_nfd_spellings_in_different_splits_are_one_class(tmp_path, folder):
    root = tmp_path / "images"
    folder(root / "train", {CAFE_NFC: 4, "dog": 4})
    folder(root / "test", {CAFE_NFD: 2, "dog": 2})
    classes, rows, _ = prepare_index(root, 0.15, 0.15, SEED)
    assert classes == [CAFE_NFC, "dog"]
    assert {row[2] for row in rows if row[1] == CAFE_NFC} == {"train", "val", "test"}


# --------------------------------------------------------------------------------------------
# Stray files, too few classes or images, missing folder


def test_files_in_the_root_are_skipped(tmp_path, folder, make_image):
    root = folder(tmp_path / "images", {"cat": 3, "dog": 3})
    make_image(root / "unlabeled.png", "cat", seed=60, size=(8, 8))
    (root / "README.txt").write_text("my images\n", encoding="utf-8")
    os.symlink("cat/0.png", root / "link.png")

    index = index_image_folder(root)
    assert index.classes == ["cat", "dog"]
    assert len(index.samples) == 6
    assert _reasons(index) == {
        "unlabeled.png": "root_file",
        "README.txt": "root_file",
        "link.png": "root_file",
    }


def test_class_with_only_an_unusable_image_is_named(tmp_path, folder):
    root = folder(tmp_path / "images", {"cat": 4, "dog": 4})
    good = (root / "dog" / "0.png").read_bytes()
    (root / "fish").mkdir()
    (root / "fish" / "half.png").write_bytes(good[: len(good) // 2])
    (root / "fish" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")

    assert index_image_folder(root).classes == ["cat", "dog", "fish"]
    with pytest.raises(ValueError, match="class 'fish' has no usable image"):
        prepare_index(root, 0.15, 0.15, SEED)


@pytest.mark.parametrize("count", [1, 2])
def test_class_too_small_to_split_is_named_with_its_count(tmp_path, folder, count):
    root = folder(tmp_path / "images", {"cat": 4, "dog": 4, "bird": count})
    with pytest.raises(ValueError, match=f"class 'bird' has {count} distinct image"):
        prepare_index(root, 0.15, 0.15, SEED)


def test_one_class_is_not_enough_even_with_hidden_folders(tmp_path, folder, make_image):
    root = folder(tmp_path / "only_cats", {"cat": 4})
    make_image(root / ".ipynb_checkpoints" / "a.png", "cat", seed=70, size=(8, 8))
    make_image(root / "__MACOSX" / "b.png", "cat", seed=71, size=(8, 8))
    make_image(root / "stray.png", "cat", seed=72, size=(8, 8))
    with pytest.raises(ValueError, match=r"only_cats: .*found 1 \(cat\)"):
        prepare_index(root, 0.15, 0.15, SEED)


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_data_dir_that_is_not_a_folder_is_named(tmp_path, kind):
    root = tmp_path / "my_images"
    if kind == "file":
        root.write_bytes(b"not a folder")
    with pytest.raises(FileNotFoundError, match="my_images"):
        prepare_index(root, 0.15, 0.15, SEED)


def test_hidden_folders_are_not_classes(tmp_path, folder, make_image):
    root = folder(tmp_path / "images", {"cat": 4, "dog": 4})
    make_image(root / ".ipynb_checkpoints" / "a.png", "cat", seed=80, size=(8, 8))
    make_image(root / "__MACOSX" / "cat" / "._0.png", "cat", seed=81, size=(8, 8))
    classes, rows, report = prepare_index(root, 0.15, 0.15, SEED)
    assert classes == ["cat", "dog"]
    assert len(rows) == 8
    assert report["skipped_by_reason"] == {"hidden": 2}


# --------------------------------------------------------------------------------------------
# Every file accounted for, in any listing order


# The messy folder's 32x32 "huge" image is above this limit; its other images (at most 16x16)
# are not. A real decompression bomb is tested in test_images.py.
_PIXEL_LIMIT = 300


def _write_messy_folder(root: Path, outside: Path, folder, make_image) -> Path:
    """Good images in three classes, plus one of every kind of file that must be skipped."""
    folder(root, {"cat": 5, "dog": 5, "bird": 4})
    make_image(root / "cat" / "indoor" / "deep.jpg", "cat", seed=300, size=(8, 8))
    good_png = (root / "dog" / "0.png").read_bytes()
    make_image(root / "dog" / "photo.jpg", "dog", seed=301, size=(16, 16))
    good_jpeg = (root / "dog" / "photo.jpg").read_bytes()
    # Undecodable files with image extensions, and non-images.
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "cat" / "text.JPG").write_text("not a JPEG\n", encoding="utf-8")
    (root / "cat" / "half.png").write_bytes(good_png[: len(good_png) // 2])
    (root / "dog" / "half.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (root / "dog" / "notes.txt").write_text("good dogs\n", encoding="utf-8")
    Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "bird" / "huge.png")  # see _PIXEL_LIMIT
    # Hidden and system files, at every level.
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    make_image(root / ".ipynb_checkpoints" / "a.png", "cat", seed=302, size=(8, 8))
    make_image(root / "dog" / ".ipynb_checkpoints" / "b.png", "dog", seed=303, size=(8, 8))
    (root / "__MACOSX" / "cat").mkdir(parents=True)
    (root / "__MACOSX" / "cat" / "._1.png").write_bytes(b"\x00\x05\x16\x07")
    (root / "bird" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "bird" / "desktop.ini").write_text("[.ShellClassInfo]\n", encoding="utf-8")
    # Files outside any class.
    (root / "README.md").write_text("about these images\n", encoding="utf-8")
    make_image(root / "unlabeled.png", "cat", seed=304, size=(8, 8))
    # Links: a loop, out of the root, dangling, and a second path to an indexed file.
    outside.mkdir(parents=True, exist_ok=True)
    make_image(outside / "secret.png", "cat", seed=305, size=(8, 8))
    os.symlink(root, root / "cat" / "loop", target_is_directory=True)
    os.symlink(outside / "secret.png", root / "dog" / "secret.png")
    os.symlink(outside, root / "bird" / "elsewhere", target_is_directory=True)
    os.symlink(outside / "nothing.png", root / "bird" / "dangling.png")
    os.symlink(outside / "nothing", root / "dangling_at_root")
    os.symlink("1.png", root / "cat" / "alias.png")
    # The same bytes under two classes.
    shutil.copy(root / "cat" / "2.png", root / "bird" / "cat_in_disguise.png")
    return root


def test_every_file_is_indexed_or_skipped_exactly_once(tmp_path, folder, make_image, monkeypatch):
    root = _write_messy_folder(tmp_path / "images", tmp_path / "outside", folder, make_image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", _PIXEL_LIMIT)
    on_disk = _files_on_disk(root)

    classes, rows, report = prepare_index(root, 0.15, 0.15, SEED)
    indexed = [row[0] for row in rows]
    skipped = [entry["path"] for entry in report["skipped"]]
    assert len(indexed) == len(set(indexed))
    assert len(skipped) == len(set(skipped))
    assert set(indexed).isdisjoint(skipped)
    assert set(indexed) | set(skipped) == on_disk

    assert classes == ["bird", "cat", "dog"]
    assert len(rows) == report["num_images"] == 5 + 5 + 4 + 1 + 1 - 1  # less cat/2.png
    assert report["num_skipped"] == len(skipped)
    reasons = {entry["path"]: entry["reason"] for entry in report["skipped"]}
    assert {
        path: reasons[path]
        for path in (
            "cat/empty.jpg",
            "cat/text.JPG",
            "cat/half.png",
            "dog/half.jpg",
            "dog/notes.txt",
            "bird/huge.png",
            ".DS_Store",
            "cat/._0.png",
            ".ipynb_checkpoints/a.png",
            "dog/.ipynb_checkpoints/b.png",
            "__MACOSX/cat/._1.png",
            "bird/desktop.ini",
            "README.md",
            "unlabeled.png",
            "cat/loop",
            "dog/secret.png",
            "bird/elsewhere",
            "bird/dangling.png",
            "dangling_at_root",
            "cat/alias.png",
            "cat/2.png",
            "bird/cat_in_disguise.png",
        )
    } == {
        "cat/empty.jpg": "unreadable",
        "cat/text.JPG": "unreadable",
        "cat/half.png": "truncated",
        "dog/half.jpg": "truncated",
        "dog/notes.txt": "not_image",
        "bird/huge.png": "too_large",
        ".DS_Store": "hidden",
        "cat/._0.png": "hidden",
        ".ipynb_checkpoints/a.png": "hidden",
        "dog/.ipynb_checkpoints/b.png": "hidden",
        "__MACOSX/cat/._1.png": "hidden",
        "bird/desktop.ini": "hidden",
        "README.md": "root_file",
        "unlabeled.png": "root_file",
        "cat/loop": "link_loop",
        "dog/secret.png": "link_outside",
        "bird/elsewhere": "link_outside",
        "bird/dangling.png": "link_dangling",
        "dangling_at_root": "link_dangling",
        "cat/alias.png": "link_duplicate",
        "cat/2.png": "conflicting_label",
        "bird/cat_in_disguise.png": "conflicting_label",
    }
    # Thumbs.db is skipped either as a system file or as a non-image; never indexed.
    assert reasons["bird/Thumbs.db"] in ("hidden", "not_image")
    assert set(report["skip_reasons"]) == set(reasons.values())
    assert set(reasons.values()) <= set(SKIP_REASONS)


class _Listing:
    """What os.scandir returns, in a chosen order: an iterator and a context manager."""

    def __init__(self, entries):
        self._entries = iter(entries)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._entries)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def close(self):
        pass


@pytest.mark.parametrize("order", ["reversed", "by_name_descending"])
@pytest.mark.parametrize("layout", ["class folders", "pre-split"])
def test_output_is_byte_identical_in_any_listing_order(
    tmp_path, folder, make_image, monkeypatch, order, layout
):
    if layout == "pre-split":
        root = tmp_path / "images"
        folder(root / "train", {"cat": 6, "dog": 6})
        folder(root / "test", {"cat": 2, "dog": 2})
        shutil.copy(root / "test" / "cat" / "0.png", root / "train" / "cat" / "leak.png")
        (root / "train" / ".DS_Store").write_bytes(b"\x00")
    else:
        root = _write_messy_folder(tmp_path / "images", tmp_path / "outside", folder, make_image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", _PIXEL_LIMIT)

    def output() -> bytes:
        return json.dumps(prepare_index(root, 0.15, 0.15, SEED), ensure_ascii=False).encode()

    expected = output()
    real_scandir = os.scandir
    listed = []

    def scandir(path="."):
        with real_scandir(path) as entries:
            entries = list(entries)
        listed.append(path)
        if order == "reversed":
            return _Listing(entries[::-1])
        return _Listing(sorted(entries, key=lambda e: e.name, reverse=True))

    monkeypatch.setattr(folders.os, "scandir", scandir)
    assert output() == expected
    assert len(listed) > 3, "the patched listing was not used"


# --------------------------------------------------------------------------------------------
# Pre-split layout <root>/<train|val|test>/<class>/...


def test_pre_split_folders_are_the_splits(tmp_path, folder, make_image):
    root = tmp_path / "images"
    folder(root / "train", {"cat": 4, "dog": 4})
    folder(root / "val", {"cat": 2, "dog": 2})
    folder(root / "test", {"cat": 2, "dog": 3})
    make_image(root / "train" / "stray.png", "cat", seed=400, size=(8, 8))

    classes, rows, report = prepare_index(root, 0.15, 0.15, SEED)
    assert report["layout"] == "pre-split"
    assert classes == ["cat", "dog"]
    assert len(rows) == 17
    for path, label, split, *_ in rows:
        assert path.split("/")[:2] == [split, label]
    assert report["counts"] == {
        "cat": {"train": 4, "val": 2, "test": 2},
        "dog": {"train": 4, "val": 2, "test": 3},
    }
    assert {e["path"]: e["reason"] for e in report["skipped"]} == {"train/stray.png": "root_file"}


def test_missing_val_folder_is_carved_from_train(tmp_path, folder):
    root = tmp_path / "images"
    folder(root / "train", {"cat": 8, "dog": 8})
    folder(root / "test", {"cat": 2, "dog": 2})

    _, rows, report = prepare_index(root, 0.15, 0.15, SEED)
    assert report["layout"] == "pre-split"
    for label in ("cat", "dog"):
        assert report["counts"][label]["val"] >= 1, label
        assert report["counts"][label]["test"] == 2, label  # nothing carved from train
    for path, _, split, *_ in rows:
        assert path.split("/")[0] == ("test" if split == "test" else "train"), path


def test_layout_with_a_non_split_folder_is_class_folders(tmp_path, folder):
    root = tmp_path / "images"
    folder(root, {"train": 4, "test": 4, "other": 4})  # classes that happen to be split names
    classes, _, report = prepare_index(root, 0.15, 0.15, SEED)
    assert report["layout"] == "class folders"
    assert classes == ["other", "test", "train"]


@pytest.mark.parametrize(
    ("lower", "higher"), [("train", "test"), ("train", "val"), ("val", "test")]
)
def test_same_bytes_in_two_splits_are_kept_in_the_more_held_out_one(
    tmp_path, folder, lower, higher
):
    root = tmp_path / "images"
    for split, count in (("train", 4), ("val", 2), ("test", 2)):
        folder(root / split, {"cat": count, "dog": count})
    shutil.copy(root / higher / "cat" / "0.png", root / lower / "cat" / "copy.png")

    _, rows, report = prepare_index(root, 0.15, 0.15, SEED)
    indexed = {row[0]: row[2] for row in rows}
    assert indexed[f"{higher}/cat/0.png"] == higher
    assert f"{lower}/cat/copy.png" not in indexed
    assert [(e["path"], e["reason"]) for e in report["skipped"]] == [
        (f"{lower}/cat/copy.png", "duplicate_across_splits")
    ]
    by_hash: dict[str, set[str]] = {}
    for _, _, split, digest, *_ in rows:
        by_hash.setdefault(digest, set()).add(split)
    assert all(len(splits) == 1 for splits in by_hash.values())


def test_pre_split_class_missing_from_a_split_is_named(tmp_path, folder):
    root = tmp_path / "images"
    folder(root / "train", {"cat": 4, "dog": 4, "fox": 4})
    folder(root / "val", {"cat": 2, "dog": 2, "fox": 2})
    folder(root / "test", {"cat": 2, "dog": 2})
    with pytest.raises(ValueError, match="class 'fox' has no usable image in test"):
        prepare_index(root, 0.15, 0.15, SEED)


# --------------------------------------------------------------------------------------------
# Awkward class names reach index.csv intact


def test_class_names_with_newline_or_formula_survive_the_index_csv(tmp_path, folder):
    names = ["=HYPERLINK(1)", "two\nlines", "plain, with comma"]
    root = folder(tmp_path / "images", {name: 4 for name in names})
    classes, rows, _ = prepare_index(root, 0.15, 0.15, SEED)
    assert classes == sorted(names)

    index_csv = tmp_path / "index.csv"
    write_csv(index_csv, INDEX_HEADER, rows)
    read_back = read_csv(index_csv)
    assert [[row[key] for key in INDEX_HEADER] for row in read_back] == rows


def test_case_variants_in_different_split_folders_are_refused(tmp_path, folder):
    """`train/Cat` and `test/cat` would be two classes, each missing a split: say why."""
    root = folder(
        tmp_path / "images",
        {"train/Cat": 4, "train/dog": 4, "test/cat": 2, "test/dog": 2},
    )
    with pytest.raises(ValueError, match=r"'Cat', 'cat' differ only by case"):
        index_image_folder(root)
