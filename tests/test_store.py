"""The store (headstart.store): extract and prepare compute only what they have not seen, and
write the same bytes as a run from scratch, whatever the store holds or lacks.

Runs the real stage scripts on tiny generated images with a random-init backbone; each test has
its own empty store (conftest.store_root).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, save_image
from test_stages import _save_random_lite0, load_stage

from headstart import cli, feature_store, store
from headstart.errors import UsageError

EXTRACTED = re.compile(
    r"extracted (\d+) images in .*: (\d+) from the feature store, (\d+) computed"
)
VALIDATED = re.compile(r"validated (\d+) files: (\d+) found in the store, (\d+) decoded")
FEATURE_FILES = [
    f"{split}_{part}.npy" for split in ("train", "val", "test") for part in ("features", "labels")
]


@pytest.fixture
def work(tmp_path, monkeypatch, params_dict, write_params):
    """A folder with params.yaml, where tests run the stages. Batches of 16 (36 images: 16, 16
    and 4): on this CPU (AVX2, oneDNN) at 1 thread, an image's features in a batch of 16
    differ from those in a batch of 1 to 15, which the padding of short batches prevents."""
    monkeypatch.chdir(tmp_path)
    params_dict["inference"]["batch_size"] = 16
    write_params(tmp_path, params_dict)
    return tmp_path


def _extract(caplog, data: Path | str, out: str) -> tuple[int, int]:
    """prepare then extract `data` into out/prepared and out/features; (from the store,
    computed) as extract logged them."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        load_stage("prepare").main([str(data), f"{out}/prepared", f"{out}/data.json"])
        load_stage("extract").main([str(data), f"{out}/prepared", f"{out}/features"])
    (total, found, computed), *_ = [m.groups() for m in map(EXTRACTED.search, caplog.messages) if m]
    assert int(total) == int(found) + int(computed)
    return int(found), int(computed)


def _assert_same_files(first: Path, second: Path, names: list[str]) -> None:
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def _copy_some(source: Path, target: Path, keep) -> Path:
    for path in sorted(source.rglob("*.*")):
        if keep(path):
            (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target / path.relative_to(source))
    return target


def _others(root: Path, seed: int, count: int = 4) -> Path:
    """`count` more images per class under root, unlike any of the fixture's."""
    for class_index, label in enumerate(CLASSES):
        for index in range(count):
            save_image(
                root / label / f"other_{seed}_{index}.png",
                label,
                50_000 + 100 * seed + 10 * class_index + index,
            )
    return root


def test_features_are_the_same_bytes_computed_together_or_over_three_runs_with_others(
    work, image_folder, caplog, monkeypatch, tmp_path
):
    """The 36 images extracted in one run, and the same images extracted a third at a time in
    three runs among other images (other batches, other places in them): then a run over the
    36 finds them all in the store and writes exactly the files of the single run."""
    monkeypatch.setenv(store.LOCATION_VARIABLE, str(tmp_path / "together-store"))
    assert _extract(caplog, image_folder, "together") == (0, 36)

    monkeypatch.setenv(store.LOCATION_VARIABLE, str(tmp_path / "spread-store"))
    files = sorted(image_folder.rglob("*.*"))
    for part in range(3):
        chosen = set(files[part::3])
        data = _copy_some(image_folder, tmp_path / f"part{part}", chosen.__contains__)
        _others(data, seed=part)
        assert _extract(caplog, data, f"part{part}") == (0, 12 + 12)
    assert _extract(caplog, image_folder, "spread") == (36, 0)
    _assert_same_files(
        tmp_path / "together" / "features",
        tmp_path / "spread" / "features",
        [*FEATURE_FILES, "meta.json"],
    )
    _assert_same_files(
        tmp_path / "together" / "prepared",
        tmp_path / "spread" / "prepared",
        ["index.csv", "classes.json", "report.json"],
    )


def test_a_damaged_store_entry_is_computed_again_and_the_output_is_unchanged(
    work, image_folder, caplog, store_root
):
    """One entry with a flipped byte, one cut short, one gone: each is detected (checksum) and
    computed again; the features are the bytes of the first run, and the entries are whole
    again."""
    assert _extract(caplog, image_folder, "first") == (0, 36)
    entries = sorted((store_root / "features").rglob("*/??/*"))
    assert len(entries) == 36
    flipped = bytearray(entries[0].read_bytes())
    flipped[100] ^= 0x01
    entries[0].write_bytes(bytes(flipped))
    entries[1].write_bytes(entries[1].read_bytes()[:50])
    entries[2].unlink()

    assert _extract(caplog, image_folder, "second") == (33, 3)
    assert any("fails its checksum" in message for message in caplog.messages)
    _assert_same_files(
        work / "first" / "features", work / "second" / "features", [*FEATURE_FILES, "meta.json"]
    )
    assert _extract(caplog, image_folder, "third") == (36, 0)


def test_an_entry_gone_during_the_run_is_computed_alone(tmp_path):
    """An entry found by the look-up and gone when it is read (a prune beside the run) is
    computed by itself; the others come from the store and from the computed batches."""
    from headstart.index import Images

    shelf = store.Shelf(tmp_path / "shelf", "key")
    names = [f"{i:064x}" for i in range(5)]
    images = Images(names, np.arange(5), np.zeros(5, dtype=np.int8), np.array(names, dtype="S64"))
    rows = np.arange(10, dtype=np.float32).reshape(5, 2)
    for position in (0, 1, 3):
        shelf.put(names[position], rows[position].tobytes())
    found = feature_store.look_up(shelf, images, width=2)
    assert found.tolist() == [True, True, False, True, False]
    (tmp_path / "shelf" / names[1][:2] / names[1]).unlink()
    asked = []

    def compute_one(position):
        asked.append(position)
        return rows[position]

    computed = [(rows[[2, 4]], np.array([2, 4]))]
    out = list(feature_store.merged(images, found, computed, shelf, 2, 2, compute_one))
    assert asked == [1]
    np.testing.assert_array_equal(np.concatenate([f for f, _ in out]), rows)
    assert [len(f) for f, _ in out] == [2, 2, 1]
    assert shelf.get(names[4]) == rows[4].tobytes()  # computed rows are stored


def test_changing_any_part_of_the_key_misses_the_store(
    work, image_folder, caplog, params_dict, write_params, store_root
):
    """Input size, backbone, weights, precision, threads and batch size each give another key:
    nothing is found; a setting outside the key (loader processes) finds everything."""
    assert _extract(caplog, image_folder, "base") == (0, 36)
    import torch

    (work / "pretrained").mkdir()
    state = torch.load(_save_random_lite0(work / "pretrained" / "lite0.pth"), weights_only=True)
    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(other, work / "pretrained" / "other.pth")  # the same network, other weights
    changes = [
        ("backbone", "image_size", 40),
        ("backbone", "name", "efficientnet_lite1"),
        ("backbone", "weights", "pretrained/other.pth"),
        ("compute", "precision", "bfloat16"),
        ("inference", "batch_size", 12),
        ("compute", "threads", 2),  # last: torch keeps the count for the runs after it
    ]
    for number, (section, key, value) in enumerate(changes, start=1):
        changed = json.loads(json.dumps(params_dict))
        changed[section][key] = value
        write_params(work, changed)
        assert _extract(caplog, image_folder, f"changed{number}") == (0, 36), (section, key)
        assert len(list((store_root / "features").iterdir())) == 1 + number
    torch.set_num_threads(1)  # as conftest set it
    same = json.loads(json.dumps(params_dict))
    same["compute"]["num_workers"] = 1
    write_params(work, same)
    assert _extract(caplog, image_folder, "same") == (36, 0)
    _assert_same_files(work / "base" / "features", work / "same" / "features", FEATURE_FILES)


def test_removing_images_gives_what_a_run_from_scratch_on_the_rest_gives(
    work, image_folder, caplog, monkeypatch
):
    assert _extract(caplog, image_folder, "all") == (0, 36)
    for path in sorted(image_folder.rglob("*_0[0-1].*")):
        path.unlink()
    assert _extract(caplog, image_folder, "fewer") == (30, 0)
    monkeypatch.setenv(store.SWITCH_VARIABLE, "off")
    assert _extract(caplog, image_folder, "scratch") == (0, 30)
    _assert_same_files(
        work / "fewer" / "features", work / "scratch" / "features", [*FEATURE_FILES, "meta.json"]
    )


def _prepare(caplog, data: Path, out: str) -> tuple[int, int, int] | None:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        load_stage("prepare").main([str(data), f"{out}/prepared", f"{out}/data.json"])
    found = [tuple(map(int, m.groups())) for m in map(VALIDATED.search, caplog.messages) if m]
    return found[0] if found else None


def test_prepare_decodes_only_new_files_and_writes_what_it_writes_from_scratch(
    work, image_folder, caplog, monkeypatch, store_root
):
    """With near-copy hashing on (the test params): a second prepare after adding two images
    decodes those two; its files equal those of a prepare without the store; a damaged entry
    is decoded again."""
    assert _prepare(caplog, image_folder, "first") == (36, 0, 36)
    save_image(image_folder / "cat" / "new_1.jpg", "cat", 777)
    save_image(image_folder / "dog" / "new_2.png", "dog", 778)
    entry = sorted((store_root / "prepare").rglob("*/??/*"))[5]
    entry.write_bytes(entry.read_bytes()[:-1] + b"x")
    assert _prepare(caplog, image_folder, "grown") == (38, 35, 3)
    monkeypatch.setenv(store.SWITCH_VARIABLE, "off")
    assert _prepare(caplog, image_folder, "scratch") is None
    names = ["prepared/index.csv", "prepared/classes.json", "prepared/report.json", "data.json"]
    _assert_same_files(work / "grown", work / "scratch", names)


def test_the_store_never_lives_in_the_data_or_where_git_tracks(
    work, image_folder, monkeypatch, stage_run, tmp_path
):
    monkeypatch.setenv(store.LOCATION_VARIABLE, str(image_folder / "cache"))
    code, errors = stage_run(load_stage("prepare").main, [str(image_folder), "p", "d.json"])
    assert code == 1 and "HEADSTART_CACHE_DIR" in errors[0] and "data.dir" in errors[0], errors
    assert not (image_folder / "cache").exists()

    repository = tmp_path / "repository"
    subprocess.run(["git", "init", "-q", str(repository)], check=True)
    store.check_location(repository / "store", image_folder)  # another repository's: allowed
    monkeypatch.chdir(repository)  # the project's
    with pytest.raises(UsageError, match="inside the git work tree"):
        store.check_location(repository / "store", image_folder)
    (repository / ".gitignore").write_text("store/\n")
    store.check_location(repository / "store", image_folder)  # ignored: allowed


def test_prune_removes_the_least_recently_used_first_and_a_hit_counts_as_use(tmp_path):
    shelf = store.Shelf(tmp_path / "features" / "key", "key")
    names = [f"{i:064x}" for i in range(4)]
    for age, name in enumerate(names):
        shelf.put(name, bytes(5000))
        os.utime(shelf._path(name), (1000 + age, 1000 + age))
    assert shelf.get(names[0]) is not None  # used now: the newest
    one = store.info(tmp_path)["bytes"] // 4
    done = store.prune(2 * one, tmp_path)
    assert done["removed"] == 2
    assert [shelf.get(name, touch=False) is not None for name in names] == [
        True,
        False,
        False,
        True,
    ]
    assert store.prune(0, tmp_path)["bytes"] == 0
    assert not (tmp_path / "features" / "key").exists()  # an emptied key goes too


def _write_entries(root: str, worker: int) -> None:
    shelf = store.Shelf(Path(root), "key")
    for index in range(300):
        shelf.put(f"{index:064x}", index.to_bytes(4, "little") * 1000)  # shared by both
        shelf.put(f"{worker:032x}{index:032x}", bytes([worker]) * 3000)  # this worker's


def test_two_processes_writing_at_once_leave_whole_entries_and_no_duplicates(tmp_path):
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=_write_entries, args=(str(tmp_path), w)) for w in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    shelf = store.Shelf(tmp_path, "key")
    for index in range(300):
        assert shelf.get(f"{index:064x}") == index.to_bytes(4, "little") * 1000
        for worker in (1, 2):
            assert shelf.get(f"{worker:032x}{index:032x}") == bytes([worker]) * 3000
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 900 and not [p for p in files if p.name.endswith(".tmp")]


def test_cache_command_shows_prunes_and_clears(work, image_folder, caplog, capsys, store_root):
    _extract(caplog, image_folder, "run")
    assert cli.main(["cache", "info", "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["location"] == str(store_root)
    assert shown["kinds"]["features"]["entries"] == 36
    assert shown["kinds"]["prepare"]["entries"] == 36
    assert shown["bytes"] >= 36 * (1280 * 4 + 32)
    assert cli.main(["cache", "prune", "--max-size", str(shown["bytes"] // 2)]) == 0
    assert 0 < store.info()["bytes"] <= shown["bytes"] // 2
    assert cli.main(["cache", "prune", "--max-size", "lots"]) == 2
    assert "--max-size" in capsys.readouterr().err
    assert cli.main(["cache", "clear"]) == 0
    assert store.info()["bytes"] == 0
    assert cli.main(["cache", "info"]) == 0
    assert "0 entries" in capsys.readouterr().out
    # Cleared, the next run computes everything again and writes the same bytes.
    assert _extract(caplog, image_folder, "again") == (0, 36)
    _assert_same_files(
        work / "run" / "features", work / "again" / "features", [*FEATURE_FILES, "meta.json"]
    )
