"""Adversarial inputs: names and files that broke prepare, predict, checkpoints or writers.

Each case goes through the real entry point (`python stages/prepare.py` in a process of its own,
or the `headstart` command's main), and checks the exit code, that the message names the file,
and that no input and no earlier output changed.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import classifier_meta
from PIL import Image

from headstart import stage
from headstart.backbones import build_backbone
from headstart.checkpoints import load_checkpoint, save_checkpoint
from headstart.cli import main as cli_main
from headstart.errors import ArtifactError, NonFiniteError, OutputError
from headstart.folders import SKIP_REASONS
from headstart.images import MAX_ASPECT_RATIO, UnusableImage, decode_image
from headstart.index import load_prepared
from headstart.io import csv_text, printable, read_json, write_csv, write_json
from headstart.model import Classifier

PROJECT = Path(__file__).resolve().parents[1]
PREPARED = ("data/prepared/index.csv", "data/prepared/classes.json", "data/prepared/report.json")


# --- helpers -------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, object]:
    """Every entry below root: a regular file's bytes, else its file type (never opened)."""
    entries: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            key = os.fsencode(os.path.relpath(path, root))
            if stat.S_ISREG(mode):
                with open(path, "rb") as handle:
                    entries[key] = handle.read()
            elif stat.S_ISLNK(mode):
                entries[key] = ("link", os.readlink(path))
            else:
                entries[key] = stat.S_IFMT(mode)
    return entries


def _work(tmp_path: Path, image_folder: Path, params_dict, write_params) -> Path:
    """tmp_path as a project: params.yaml (data.dir: images) beside the image folder."""
    assert image_folder == tmp_path / "images"
    write_params(tmp_path, params_dict)
    return tmp_path


def _prepare(work: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python stages/prepare.py images data/prepared metrics/data.json` in `work`, as dvc runs
    it; stderr as bytes, exactly what reaches the terminal."""
    return subprocess.run(
        [
            sys.executable,
            str(PROJECT / "stages" / "prepare.py"),
            "images",
            "data/prepared",
            "metrics/data.json",
        ],
        cwd=work,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def _skipped(work: Path) -> dict[str, dict]:
    report = read_json(work / "data/prepared/report.json")
    return {s["path"]: s for s in report["skipped"]}


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A classifier checkpoint as finetune writes it (as test_cli's): pretrained backbone."""
    torch.manual_seed(0)
    model = Classifier(build_backbone("efficientnet_lite0", "pretrained"), 3)
    path = tmp_path_factory.mktemp("model") / "finetuned.pt"
    save_checkpoint(path, model.state_dict(), classifier_meta(model, ["bird", "cat", "dog"]))
    return path


@pytest.fixture
def alarm():
    """alarm(seconds): fail the test instead of blocking forever (a FIFO opened for reading)."""

    def expired(signum, frame):
        raise TimeoutError("blocked: a FIFO was opened")

    previous = signal.signal(signal.SIGALRM, expired)
    yield signal.alarm
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# --- 1. CSV that reads back ------------------------------------------------------------------

AWKWARD = [
    "plain.png",
    "a\rb.png",
    "a\r\nb.png",
    "trailing\r",
    "\r",
    "a\nb.png",
    'quo"te.png',
    "com,ma.png",
    " lead and trail ",
    "",
    "tab\there",
    "\x1b[31mred",
    "naïve ✓",
]


def test_csv_text_reads_back_any_string_and_keeps_ordinary_rows_bytes():
    rows = [[name, "bird", "train", "0" * 64, "3", "4"] for name in AWKWARD]
    text = csv_text(["path", "label", "split", "sha256", "width", "height"], rows)
    read = list(csv.reader(io.StringIO(text, newline="")))
    assert read[1:] == rows
    # A row without "\r" has exactly the bytes csv.writer gave it before (byte-identical outputs).
    ordinary = [r for r in rows if "\r" not in r[0]]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "split", "sha256", "width", "height"])
    writer.writerows(ordinary)
    assert csv_text(["path", "label", "split", "sha256", "width", "height"], ordinary) == (
        buffer.getvalue()
    )


def test_write_csv_round_trips_a_carriage_return(tmp_path):
    path = tmp_path / "index.csv"
    write_csv(path, ["path", "label"], [["cat/a\rb.png", "cat"], ["cat/c.png", "ca\rt"]])
    with open(path, newline="", encoding="utf-8") as handle:
        assert list(csv.reader(handle)) == [
            ["path", "label"],
            ["cat/a\rb.png", "cat"],
            ["cat/c.png", "ca\rt"],
        ]


def test_prepare_writes_an_index_that_reads_back_a_carriage_return_in_a_file_name(
    tmp_path, image_folder, make_image, params_dict, write_params
):
    work = _work(tmp_path, image_folder, params_dict, write_params)
    make_image(image_folder / "cat" / "a\rb.png", "cat", seed=77)
    before = _snapshot(image_folder)
    result = _prepare(work)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    prepared = load_prepared(image_folder, work / "data/prepared")  # as extract reads it
    assert "cat/a\rb.png" in prepared.images.paths
    assert len(prepared.images) == 37
    assert _snapshot(image_folder) == before


def test_predict_csv_reads_back_a_carriage_return_in_a_path(
    checkpoint, tmp_path, make_image, capsys
):
    image = make_image(tmp_path / "in" / "a\rb.png", "cat", seed=5)
    code, out, _ = _cli(capsys, "predict", checkpoint, image, "--format", "csv", "--top-k", 2)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out, newline="")))
    assert [r["path"] for r in rows] == [str(image), str(image)]
    assert [r["rank"] for r in rows] == ["1", "2"]


# --- 2. names that are not UTF-8 -------------------------------------------------------------


def test_prepare_skips_names_that_are_not_utf8(
    tmp_path, image_folder, make_image, params_dict, write_params
):
    work = _work(tmp_path, image_folder, params_dict, write_params)
    make_image(Path(os.fsdecode(bytes(image_folder / "cat") + b"/\xff.png")), "cat", seed=11)
    bad_class = Path(os.fsdecode(bytes(image_folder) + b"/\xfeclass"))
    for index in range(3):
        make_image(bad_class / f"img{index}.png", "dog", seed=20 + index)
    before = _snapshot(image_folder)

    result = _prepare(work)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0, stderr
    assert "Traceback" not in stderr and "UnicodeEncodeError" not in stderr
    assert read_json(work / "data/prepared/classes.json") == ["bird", "cat", "dog"]
    skipped = _skipped(work)
    assert skipped["cat/\\xff.png"]["reason"] == "unencodable_name"
    assert "b'\\xff.png'" in skipped["cat/\\xff.png"]["detail"]
    for index in range(3):
        entry = skipped[f"\\xfeclass/img{index}.png"]
        assert entry["reason"] == "unencodable_name" and "\\xfeclass" in entry["detail"]
    report = read_json(work / "data/prepared/report.json")
    assert report["skip_reasons"]["unencodable_name"] == SKIP_REASONS["unencodable_name"]
    assert report["num_images"] == 36
    assert _snapshot(image_folder) == before


@pytest.mark.parametrize("output", ["json", "csv", "table"])
def test_predict_reports_a_name_that_is_not_utf8_and_predicts_the_others(
    checkpoint,
    tmp_path,
    make_image,
    capsys,
    output,
):
    folder = tmp_path / "in"
    good = make_image(folder / "good.png", "cat", seed=1)
    bad = Path(os.fsdecode(bytes(folder) + b"/\xff.png"))
    make_image(bad, "dog", seed=2)
    code, out, err = _cli(capsys, "predict", checkpoint, folder, "--format", output)
    assert code == 1, err
    assert "Traceback" not in err
    shown = f"{folder}/\\xff.png"
    if output == "json":
        results = {r["path"]: r for r in json.loads(out)}
        assert results[shown]["error"]["reason"] == "unencodable_name"
        assert results[str(good)]["error"] is None and results[str(good)]["predictions"]
    elif output == "csv":
        rows = {r["path"]: r for r in csv.DictReader(io.StringIO(out, newline=""))}
        assert rows[shown]["error"].startswith("unencodable_name: ")
        assert rows[str(good)]["error"] == "" and rows[str(good)]["class"]
    else:
        [line] = [line for line in out.splitlines() if line.startswith(shown)]
        assert "ERROR unencodable_name" in line


# --- 3. control characters never reach the terminal raw ---------------------------------------


def test_printable_escapes_control_characters_and_keeps_the_rest():
    assert printable("\x1b[31mred\x1b[0m") == "\\x1b[31mred\\x1b[0m"
    assert printable("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert printable("naïve ✓ 猫 space") == "naïve ✓ 猫 space"
    assert printable("\u202egnp.exe") == "\\u202egnp.exe"  # a bidi override
    assert printable(os.fsdecode(b"\xff.png")) == "\\xff.png"


def test_prepare_log_escapes_control_characters_in_class_names(
    tmp_path, image_folder, make_image, params_dict, write_params
):
    work = _work(tmp_path, image_folder, params_dict, write_params)
    evil = "\x1b[31mevil\nINFO fake"
    for index in range(12):
        make_image(image_folder / evil / f"e{index:02d}.png", "other", seed=300 + index)
    (image_folder / "cat" / "\x1b[2Jbroken.png").write_bytes(b"not an image")
    before = _snapshot(image_folder)

    result = _prepare(work)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert "\x1b" not in stderr and "\nINFO fake" not in stderr
    assert "\\x1b[31mevil\\nINFO fake" in stderr  # the summary table names the class, escaped
    # The outputs keep the true names.
    assert evil in read_json(work / "data/prepared/classes.json")
    assert _skipped(work)["cat/\x1b[2Jbroken.png"]["reason"] == "unreadable"
    assert _snapshot(image_folder) == before


def test_prepare_error_escapes_a_class_name(tmp_path, make_image, params_dict, write_params):
    images = tmp_path / "images"
    make_image(images / "\x1b[2Jonly" / "a.png", "cat", seed=1)
    write_params(tmp_path, params_dict)
    result = _prepare(tmp_path)
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "\x1b" not in stderr and "\\x1b[2Jonly" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "data").exists()


def test_predict_table_and_warnings_escape_control_characters(
    checkpoint,
    tmp_path,
    make_image,
    capsys,
    caplog,
):
    state, meta = load_checkpoint(checkpoint)
    model = tmp_path / "model.pt"
    save_checkpoint(model, state, {**meta, "classes": ["\x1b[31mbird", "cat\nx", "dog"]})
    good = make_image(tmp_path / "in" / "\x1b]0;title\x07good.png", "cat", seed=3)
    broken = tmp_path / "in" / "bro\nken.png"
    broken.write_bytes(b"not an image")
    caplog.set_level(logging.WARNING)
    code, out, err = _cli(capsys, "predict", model, good, broken, "--top-k", 3)
    assert code == 1
    for text in (out, err, caplog.text):
        assert "\x1b" not in text and "\x07" not in text
    lines = out.splitlines()
    assert len(lines) == 3  # header, good, broken: no line broken by a name
    assert lines[1].startswith(printable(str(good)))
    assert "\\x1b[31mbird (" in lines[1] and "cat\\nx (" in lines[1]
    assert lines[2].startswith(printable(str(broken))) and "ERROR unreadable" in lines[2]
    assert f"{printable(str(broken))}: unreadable" in caplog.text
    # JSON keeps the true values.
    code, out, _ = _cli(capsys, "predict", model, good, "--format", "json", "--top-k", 3)
    assert code == 0
    result = json.loads(out)[0]
    assert result["path"] == str(good)
    assert {p["class"] for p in result["predictions"]} == {"\x1b[31mbird", "cat\nx", "dog"}


# --- 4. FIFOs and other non-regular files ------------------------------------------------------


def test_prepare_skips_a_fifo_without_opening_it(tmp_path, image_folder, params_dict, write_params):
    work = _work(tmp_path, image_folder, params_dict, write_params)
    os.mkfifo(image_folder / "cat" / "pipe.png")
    os.symlink("pipe.png", image_folder / "cat" / "link_to_pipe.png")
    os.symlink("cat_00.png", image_folder / "cat" / "link_to_image.png")  # as today
    before = _snapshot(image_folder)

    result = _prepare(work, timeout=120)  # before the fix: blocked in open() until killed
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    skipped = _skipped(work)
    assert skipped["cat/pipe.png"]["reason"] == "not_regular"
    assert "FIFO" in skipped["cat/pipe.png"]["detail"]
    assert skipped["cat/link_to_pipe.png"]["reason"] == "not_regular"
    assert skipped["cat/link_to_image.png"]["reason"] == "link_duplicate"
    report = read_json(work / "data/prepared/report.json")
    assert report["skip_reasons"]["not_regular"] == SKIP_REASONS["not_regular"]
    assert report["num_images"] == 36
    assert _snapshot(image_folder) == before


def test_decode_image_refuses_a_fifo_without_opening_it(tmp_path, alarm):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    alarm(20)
    with pytest.raises(UnusableImage) as raised:
        decode_image(fifo)
    assert raised.value.reason == "not_regular"


def test_predict_reports_a_fifo_and_predicts_the_others(
    checkpoint,
    tmp_path,
    make_image,
    capsys,
    alarm,
):
    folder = tmp_path / "in"
    good = make_image(folder / "good.png", "cat", seed=1)
    fifo = folder / "pipe.png"
    os.mkfifo(fifo)
    alarm(120)
    for inputs in ([folder], [good, fifo]):
        code, out, err = _cli(capsys, "predict", checkpoint, *inputs, "--format", "json")
        assert code == 1, err
        results = {r["path"]: r for r in json.loads(out)}
        assert results[str(fifo)]["error"]["reason"] == "not_regular"
        assert results[str(good)]["error"] is None and results[str(good)]["predictions"]


# --- 5. extreme aspect ratios -----------------------------------------------------------------


def _strip(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (200, 30, 30)).save(path, "PNG")
    return path


@pytest.mark.parametrize(
    ("size", "refused"), [((100, 2), False), ((2, 100), False), ((101, 2), True), ((1, 51), True)]
)
def test_decode_image_aspect_bound_is_exactly_50x(tmp_path, size, refused):
    path = _strip(tmp_path / "strip.png", *size)
    if not refused:
        assert decode_image(path).image.size == size
        return
    with pytest.raises(UnusableImage) as raised:
        decode_image(path)
    assert raised.value.reason == "extreme_aspect"
    assert f"{size[0]}x{size[1]}" in raised.value.detail


def test_prepare_skips_an_extreme_aspect_ratio(tmp_path, image_folder, params_dict, write_params):
    work = _work(tmp_path, image_folder, params_dict, write_params)
    _strip(image_folder / "cat" / "strip.png", 400_000, 1)  # 0.4 megapixels
    before = _snapshot(image_folder)
    result = _prepare(work)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    skipped = _skipped(work)
    assert skipped["cat/strip.png"]["reason"] == "extreme_aspect"
    assert "400000x1" in skipped["cat/strip.png"]["detail"]
    report = read_json(work / "data/prepared/report.json")
    assert report["skip_reasons"]["extreme_aspect"] == SKIP_REASONS["extreme_aspect"]
    assert "cat/strip.png" not in load_prepared(image_folder, work / "data/prepared").images.paths
    assert _snapshot(image_folder) == before


def test_predict_reports_an_extreme_aspect_image_and_predicts_the_others(
    checkpoint,
    tmp_path,
    make_image,
    capsys,
    caplog,
):
    good = make_image(tmp_path / "in" / "good.png", "cat", seed=1)
    # 3200 x 1 is harmless to resize (the test must not need GBs before the fix), and refused.
    strip = _strip(tmp_path / "in" / "strip.png", 3200, 1)
    code, out, err = _cli(capsys, "predict", checkpoint, good, strip, "--format", "json")
    assert code == 1, err
    results = {r["path"]: r for r in json.loads(out)}
    assert results[str(strip)]["error"]["reason"] == "extreme_aspect"
    assert results[str(good)]["error"] is None and results[str(good)]["predictions"]
    assert f"{strip}: extreme_aspect" in caplog.text  # the warning names the file


# --- 6. NaN and infinity in JSON outputs ----------------------------------------------------


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_write_json_refuses_non_finite_numbers_and_keeps_the_previous_file(tmp_path, number):
    path = tmp_path / "metrics" / "evaluate.json"
    write_json(path, {"accuracy": 0.5})
    previous = path.read_bytes()
    with pytest.raises(NonFiniteError) as raised:
        write_json(path, {"accuracy": 0.5, "history": [{"loss": 1.0}, {"loss": number}]})
    message = str(raised.value)
    assert message.startswith(f"{path}: history[1].loss is {number}")
    assert "lower the learning rates" in message and "\n" not in message
    assert isinstance(raised.value, ValueError)
    assert path.read_bytes() == previous
    assert sorted(os.listdir(path.parent)) == ["evaluate.json"]  # no temporary file left


def test_a_stage_writing_nan_exits_1_with_one_line(tmp_path, caplog):
    path = tmp_path / "metrics.json"
    write_json(path, {"loss": 0.25})
    previous = path.read_bytes()
    caplog.set_level(logging.INFO)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        code = stage.run(lambda argv: write_json(path, {"loss": float("nan")}), [])
    finally:
        signal.signal(signal.SIGTERM, handler)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 1
    assert len(errors) == 1 and errors[0].startswith(f"{path}: loss is nan")
    assert path.read_bytes() == previous


def test_write_json_keeps_other_value_errors_as_bugs(tmp_path):
    circular: list = []
    circular.append(circular)
    with pytest.raises(ValueError) as raised:
        write_json(tmp_path / "x.json", circular)
    assert not isinstance(raised.value, NonFiniteError)


# --- 7. outputs that may not be written ------------------------------------------------------


def _deny_writes_in(folder: Path, monkeypatch) -> None:
    """Make `folder` refuse new files. As a normal user chmod 0o555 does; root ignores modes,
    so there the lowest-level creation (tempfile.mkstemp, used by every atomic write) refuses
    what the kernel would, naming the file it tried to create, as the kernel's error does."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    real_mkstemp = tempfile.mkstemp

    def refusing(suffix=None, prefix=None, dir=None, text=False):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            name = os.path.join(dir, f"{prefix or 'tmp'}abc123{suffix or ''}")
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)
        return real_mkstemp(suffix=suffix, prefix=prefix, dir=dir, text=text)

    monkeypatch.setattr(tempfile, "mkstemp", refusing)


def test_export_into_a_read_only_folder_names_the_output_and_the_fix(
    checkpoint,
    tmp_path,
    capsys,
    monkeypatch,
):
    folder = tmp_path / "exports"
    out = folder / "model.ts.pt"
    code, _, err = _cli(capsys, "export", checkpoint, out, "--calibration", "none")
    assert code == 0, err
    before = _snapshot(folder)
    model_before = checkpoint.read_bytes()
    try:
        _deny_writes_in(folder, monkeypatch)
        code, out_text, err = _cli(capsys, "export", checkpoint, out, "--calibration", "none")
    finally:
        folder.chmod(0o755)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"headstart: error: {out}: permission denied")
    assert f"make {folder} writable or choose another output" in lines[0]
    assert ".tmp" not in lines[0]  # the output, never the temporary file
    assert _snapshot(folder) == before
    assert checkpoint.read_bytes() == model_before


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.EROFS])
def test_a_refused_replace_names_the_output_and_keeps_the_previous_file(
    tmp_path, monkeypatch, code
):
    path = tmp_path / "out" / "metrics.json"
    write_json(path, {"version": 1})
    previous = path.read_bytes()

    def refusing(source, target, **kwargs):
        raise OSError(code, os.strerror(code), os.fspath(source), None, os.fspath(target))

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", refusing)
        with pytest.raises(OutputError) as raised:
            write_json(path, {"version": 2})
    error = raised.value
    assert error.errno == code and isinstance(error, OSError)
    assert str(error).startswith(f"{path}: {os.strerror(code).lower()}")
    assert f"make {path.parent} writable" in str(error) and ".tmp" not in str(error)
    assert path.read_bytes() == previous
    assert sorted(os.listdir(path.parent)) == ["metrics.json"]


def test_atomic_dir_into_a_refusing_folder_names_the_output(tmp_path, monkeypatch):
    from headstart.io import atomic_dir

    parent = tmp_path / "data"
    parent.mkdir()
    real_mkdtemp = tempfile.mkdtemp

    def refusing(suffix=None, prefix=None, dir=None):
        if dir is not None and Path(dir) == parent:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(parent / f"{prefix}x{suffix}"))
        return real_mkdtemp(suffix=suffix, prefix=prefix, dir=dir)

    monkeypatch.setattr(tempfile, "mkdtemp", refusing)
    with pytest.raises(OutputError) as raised:
        with atomic_dir(parent / "features"):
            pass
    assert str(raised.value).startswith(f"{parent / 'features'}: read-only file system")


def test_atomic_dir_over_a_read_only_output_folder_keeps_it_whole(tmp_path, monkeypatch):
    """rmtree(ignore_errors) would empty the writable parts of the old folder and os.replace
    then fail (ENOTEMPTY): refused before anything is removed, naming the read-only folder."""
    from headstart.io import atomic_dir, write_bytes

    features = tmp_path / "data" / "features"
    with atomic_dir(features) as out:
        write_bytes(out / "meta.json", b"{}")
        write_bytes(out / "part" / "a.npy", b"old")
        write_bytes(out / "locked" / "b.npy", b"old")
    before = _snapshot(features)
    locked = features / "locked"
    if os.geteuid() != 0:
        locked.chmod(0o555)
    else:  # root ignores modes: os.access says what the kernel would for another user
        real_access = os.access
        monkeypatch.setattr(
            os,
            "access",
            lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw),
        )
    try:
        with pytest.raises(OutputError) as raised:
            with atomic_dir(features) as out:
                write_bytes(out / "meta.json", b"{new}")
    finally:
        locked.chmod(0o755)
    message = str(raised.value)
    assert message.startswith(f"{features}: permission denied")
    assert f"make {locked} writable" in message
    assert _snapshot(features) == before
    assert sorted(os.listdir(features.parent)) == ["features"]  # no temporary folder left


def test_a_refused_read_of_an_input_inside_atomic_dir_is_not_an_output_error(tmp_path):
    from headstart.io import atomic_dir

    with pytest.raises(PermissionError) as raised:
        with atomic_dir(tmp_path / "features"):
            raise PermissionError(errno.EACCES, "Permission denied", "/data/images/cat/1.png")
    assert not isinstance(raised.value, OutputError)


# --- 8, 9. checkpoints that are empty or inflate -----------------------------------------------


def test_an_empty_checkpoint_says_so(tmp_path, image_folder, capsys):
    empty = tmp_path / "finetuned.pt"
    empty.touch()
    with pytest.raises(ArtifactError) as raised:
        load_checkpoint(empty)
    assert str(raised.value) == (
        f"{empty}: empty file (0 bytes): not a headstart checkpoint; rerun the stage that writes it"
    )
    code, _, err = _cli(capsys, "predict", empty, image_folder / "cat" / "cat_00.png")
    assert code == 2 and "Traceback" not in err
    assert f"{empty}: empty file (0 bytes)" in err
    assert empty.stat().st_size == 0


def _recompressed(source: Path, target: Path) -> Path:
    """`source`'s records, deflate-compressed: what a checkpoint that inflates looks like."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as out:
        for record in original.infolist():
            out.writestr(record, original.read(record), compress_type=zipfile.ZIP_DEFLATED)
    return target


def test_torch_save_stores_every_record_uncompressed(checkpoint):
    with zipfile.ZipFile(checkpoint) as archive:
        records = archive.infolist()
    assert records and all(r.compress_type == zipfile.ZIP_STORED for r in records)
    assert all(r.file_size == r.compress_size for r in records)
    load_checkpoint(checkpoint)  # a real checkpoint still loads


def test_a_checkpoint_with_compressed_records_is_refused(tmp_path, image_folder, capsys):
    plain = tmp_path / "plain.pt"
    # 64 MiB of zeros that deflate to a few dozen KiB: the shape of a bomb, small enough here.
    save_checkpoint(plain, {"weight": torch.zeros(4096, 4096)}, {"kind": "head"})
    bomb = _recompressed(plain, tmp_path / "finetuned.pt")
    assert bomb.stat().st_size < plain.stat().st_size // 100
    before = bomb.read_bytes()
    with pytest.raises(ArtifactError) as raised:
        load_checkpoint(bomb)
    message = str(raised.value)
    assert message.startswith(f"{bomb}: record ") and "compressed" in message
    code, _, err = _cli(capsys, "info", bomb)
    assert code == 2 and "Traceback" not in err and str(bomb) in err
    assert bomb.read_bytes() == before


def test_a_file_that_is_not_a_zip_is_left_to_torch_load(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ArtifactError, match="not a loadable headstart checkpoint"):
        load_checkpoint(junk)


def test_skip_reasons_name_the_new_codes():
    for code in ("unencodable_name", "not_regular", "extreme_aspect"):
        assert code in SKIP_REASONS
    assert "50x" in SKIP_REASONS["extreme_aspect"] and MAX_ASPECT_RATIO == 50
