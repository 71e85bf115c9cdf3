"""Faults while writing and training: a killed writer, a full disk, a batch too large for memory.

The writers are the real ones in headstart.io on real files; a full disk is simulated by making
the lowest-level write put half of its bytes on disk and then fail with ENOSPC, as a real one
does. Out of memory is simulated by a forward pass that raises what torch raises.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_features
from test_stages import load_stage, run_stages
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from headstart.backbones import Backbone
from headstart.checkpoints import load_checkpoint, save_checkpoint
from headstart.errors import DataError, OutOfMemory
from headstart.inference import run_inference
from headstart.io import (
    DiskFullError,
    atomic_dir,
    read_array,
    read_json,
    remove_orphans,
    write_array,
    write_json,
)
from headstart.model import Classifier
from headstart.train import fit

CPU = torch.device("cpu")
CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 8 GiB"
CPU_OOM = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 400000000000000 bytes. Error code 12 (Cannot allocate memory)"
)


def _temp_files(path: Path) -> list[str]:
    """Temporary siblings of `path`, as atomic_path and atomic_dir name them."""
    return sorted(p.name for p in path.parent.glob(f".{path.name}.*.tmp"))


def _state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Linear(64, 32).state_dict()


def _assert_same_state(path: Path, expected: dict[str, torch.Tensor]) -> None:
    state, meta = load_checkpoint(path)
    assert meta == {"kind": "head"}
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


PROJECT = Path(__file__).resolve().parents[1]

# --- a writer killed with SIGKILL -------------------------------------------------------

# Writes through atomic_path forever, 1 MiB at a time; says "writing" once bytes are on disk.
_ENDLESS_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from headstart.io import atomic_path

    with atomic_path(Path(sys.argv[1])) as tmp, open(tmp, "wb") as handle:
        handle.write(b"\\0" * (1 << 20))
        handle.flush()
        print("writing", flush=True)
        while True:
            handle.write(b"\\0" * (1 << 20))
            handle.flush()
    """
)


def test_sigkill_mid_write_keeps_the_previous_checkpoint_and_next_write_removes_the_orphan(
    tmp_path,
):
    path = tmp_path / "models" / "head.pt"
    previous = _state(0)
    save_checkpoint(path, previous, {"kind": "head"})
    writer = subprocess.Popen(
        [sys.executable, "-c", _ENDLESS_WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
        writer.send_signal(signal.SIGKILL)
        assert writer.wait(timeout=30) == -signal.SIGKILL
    finally:
        writer.kill()
        writer.wait(timeout=30)
        writer.stdout.close()

    # The kill left its temporary file (no handler runs on SIGKILL); the checkpoint is intact.
    orphans = _temp_files(path)
    assert len(orphans) == 1, orphans
    assert (path.parent / orphans[0]).stat().st_size >= 1 << 20
    _assert_same_state(path, previous)

    # The next write to the same path cleans up, and only then writes.
    following = _state(1)
    save_checkpoint(path, following, {"kind": "head"})
    assert _temp_files(path) == []
    assert sorted(os.listdir(path.parent)) == ["head.pt"]
    _assert_same_state(path, following)


def test_orphan_cleanup_touches_only_the_temporaries_of_that_path(tmp_path):
    target = tmp_path / "head.pt"
    mine = [".head.pt.ab12_cd3.tmp", ".head.pt.zz99zz99.tmp"]
    others = [
        ".head.pt.bak.ab12cd34.tmp",  # a temporary file of head.pt.bak
        "head.pt.tmp",  # not one of ours
        ".head.pt.AB12CD34.tmp",  # tempfile's random part is lower case
        ".head.pt.ab12cd34.tmp.keep",
        "other.pt",
    ]
    for name in mine + others:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".features.ab12cd34.tmp").mkdir()  # an orphan of atomic_dir, for features
    (tmp_path / ".features.ab12cd34.tmp" / "train_features.npy").write_bytes(b"x")

    removed = remove_orphans(target)
    assert sorted(p.name for p in removed) == sorted(mine)
    assert sorted(os.listdir(tmp_path)) == sorted(others + [".features.ab12cd34.tmp"])

    with atomic_dir(tmp_path / "features") as out:
        write_array(out / "train_features.npy", np.zeros((2, 3), np.float32))
    assert not (tmp_path / ".features.ab12cd34.tmp").exists()
    assert read_array(tmp_path / "features" / "train_features.npy").shape == (2, 3)


def test_atomic_path_removes_a_planted_orphan_before_writing(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"accuracy": 0.5})
    orphan = tmp_path / ".metrics.json.q7x2k9zp.tmp"
    orphan.write_text('{"accur', encoding="utf-8")  # what a kill mid-write leaves
    assert read_json(path) == {"accuracy": 0.5}
    write_json(path, {"accuracy": 0.75})
    assert not orphan.exists()
    assert sorted(os.listdir(tmp_path)) == ["metrics.json"]
    assert read_json(path) == {"accuracy": 0.75}


# --- disk full --------------------------------------------------------------------------


def _disk_full_after_half(data: bytes, handle) -> None:
    handle.write(data[: len(data) // 2])
    handle.flush()
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _failing_write_bytes(self: Path, data: bytes) -> int:
    """Path.write_bytes (under write_bytes, write_json, save_checkpoint) on a full disk."""
    with open(self, "wb") as handle:
        _disk_full_after_half(bytes(data), handle)


def _failing_save(file, array, allow_pickle=True, **kwargs):
    """np.save (under write_array) on a full disk."""
    _disk_full_after_half(np.ascontiguousarray(array).tobytes(), file)


def _write_checkpoint(path: Path, version: int) -> None:
    save_checkpoint(path, _state(version), {"kind": "head"})


def _check_checkpoint(path: Path, version: int) -> None:
    _assert_same_state(path, _state(version))


def _write_json(path: Path, version: int) -> None:
    write_json(path, {"version": version, "pad": "x" * 1000})


def _check_json(path: Path, version: int) -> None:
    assert read_json(path) == {"version": version, "pad": "x" * 1000}


def _write_array(path: Path, version: int) -> None:
    write_array(path, np.full((100, 10), version, np.float32))


def _check_array(path: Path, version: int) -> None:
    assert (read_array(path) == version).all()


WRITERS = {
    "checkpoint": (_write_checkpoint, _check_checkpoint),
    "json": (_write_json, _check_json),
    "array": (_write_array, _check_array),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_disk_full_keeps_the_previous_file_and_names_the_path(tmp_path, monkeypatch, kind):
    write, check = WRITERS[kind]
    path = tmp_path / "out" / f"output.{kind}"
    write(path, 1)
    previous = path.read_bytes()

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_bytes", _failing_write_bytes)
        patch.setattr(np, "save", _failing_save)
        with pytest.raises(OSError) as raised:
            write(path, 2)

    error = raised.value
    assert isinstance(error, DiskFullError)
    assert error.errno == errno.ENOSPC  # still an OSError a caller can recognise
    message = str(error)
    assert message.startswith(f"{path}: no space left on device")
    assert "free disk space" in message and "\n" not in message
    assert path.read_bytes() == previous
    check(path, 1)
    assert _temp_files(path) == []  # the half-written temporary file is gone
    # With space again, the same write succeeds.
    write(path, 2)
    check(path, 2)


def test_disk_full_inside_atomic_dir_names_the_folder_and_keeps_the_old_one(tmp_path, monkeypatch):
    features = tmp_path / "data" / "features"
    with atomic_dir(features) as out:
        write_array(out / "train_features.npy", np.ones((4, 3), np.float32))
    monkeypatch.setattr(np, "save", _failing_save)
    with pytest.raises(DiskFullError) as raised:
        with atomic_dir(features) as out:
            write_array(out / "train_features.npy", np.zeros((4, 3), np.float32))
    assert str(raised.value).startswith(f"{features}: no space left on device")
    monkeypatch.undo()
    assert (read_array(features / "train_features.npy") == 1).all()
    assert sorted(os.listdir(features.parent)) == ["features"]  # no temporary folder left


def _tiny_features(directory: Path, num_features: int = 8) -> Path:
    """A features folder as extract writes it, for train_head: 3 classes, 8 features."""
    rng = np.random.default_rng(0)
    splits = {
        split: (rng.normal(size=(count, num_features)), np.arange(count) % 3)  # (N, D), (N,)
        for split, count in (("train", 24), ("val", 9))
    }
    return write_features(directory, splits, ["a", "b", "c"])


def test_train_head_on_a_full_disk_exits_1_with_one_line(
    tmp_path, monkeypatch, params_dict, write_params, stage_run
):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, params_dict)
    _tiny_features(tmp_path / "features")
    monkeypatch.setattr(Path, "write_bytes", _failing_write_bytes)

    code, errors = stage_run(load_stage("train_head").main, ["features", "head.pt", "live"])
    assert code == 1
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert errors[0].startswith("head.pt: no space left on device")
    assert "free disk space" in errors[0]
    assert not (tmp_path / "head.pt").exists()
    assert _temp_files(tmp_path / "head.pt") == []


def test_stage_run_reports_any_disk_full_oserror_and_lets_other_oserrors_through(stage_run):
    def disk_full(argv):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "dvclive/finetune/metrics.json")

    code, errors = stage_run(disk_full, [])
    assert code == 1
    assert errors == [
        "dvclive/finetune/metrics.json: no space left on device; free disk space and run again"
    ]

    def permission_denied(argv):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "models/head.pt")

    code, errors = stage_run(permission_denied, [])  # not a disk-full problem: a bug's exit
    assert code == 3 and errors[0].startswith("internal error")


def test_stage_run_prints_user_errors_in_one_line_and_keeps_a_bugs_traceback(stage_run, caplog):
    def bad_input(argv):
        raise DataError("data/raw: expected one sub-folder per class; add class folders")

    code, errors = stage_run(bad_input, [])
    assert (code, errors) == (1, ["data/raw: expected one sub-folder per class; add class folders"])

    def bug(argv):
        raise ValueError("operands could not be broadcast together")  # numpy's, not a user's

    code, errors = stage_run(bug, [])
    assert code == 3 and errors[0].startswith("internal error")
    traceback = [r for r in caplog.records if r.exc_info]
    assert traceback and "broadcast" in str(traceback[0].exc_info[1])


def test_a_stage_outside_the_environment_says_how_to_enter_it(tmp_path):
    """`dvc repro` with the system python (the environment not activated): one line that says
    what to do, exit 1, no traceback, nothing written."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(  # -S: no site-packages, so headstart is not importable
        [sys.executable, "-S", str(PROJECT / "stages" / "prepare.py"), "raw", "out", "m.json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "source .venv/bin/activate" in lines[0] and "make repro" in lines[0]
    assert list(tmp_path.iterdir()) == []


# --- out of memory ----------------------------------------------------------------------


def _batches(count: int = 24, batch_size: int = 8) -> DataLoader:
    x = torch.randn(count, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(count) % 3
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _raising(error: BaseException, after_calls: int = 0):
    """A forward that works `after_calls` times, then raises `error`."""
    calls = {"n": 0}
    real = nn.Linear.forward

    def forward(self, inputs):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise error
        return real(self, inputs)

    return forward


def _fit_head(**options):
    head = nn.Linear(4, 3)
    groups = [{"params": list(head.parameters()), "lr": 0.01, "weight_decay": 0.0}]
    return fit(
        head,
        _batches(),
        _batches(batch_size=12),
        groups,
        epochs=2,
        patience=5,
        label_smoothing=0.0,
        device=CPU,
        desc="finetune",
        **options,
    )


@pytest.mark.parametrize(
    "error",
    [torch.cuda.OutOfMemoryError(CUDA_OOM), RuntimeError(CPU_OOM)],
    ids=["cuda", "cpu-allocator"],
)
def test_fit_out_of_memory_names_the_batch_size_key(monkeypatch, error):
    monkeypatch.setattr(nn.Linear, "forward", _raising(error))
    with pytest.raises(OutOfMemory) as raised:
        _fit_head(batch_size_key="finetune.batch_size")
    message = str(raised.value)
    assert isinstance(raised.value, MemoryError)
    assert raised.value.__cause__ is error  # the original stays in the traceback
    assert message.startswith("finetune: out of memory on cpu with batches of 8")
    assert "lower finetune.batch_size in params.yaml" in message
    assert "dvc exp run -S finetune.batch_size=4" in message
    assert "\n" not in message


def test_out_of_memory_in_validation_names_the_same_key(monkeypatch):
    # 3 training steps work; the first validation batch (of 12) does not fit.
    monkeypatch.setattr(nn.Linear, "forward", _raising(torch.cuda.OutOfMemoryError(), 3))
    with pytest.raises(
        OutOfMemory, match=r"^finetune validation: out of memory on cpu with batches of 12"
    ):
        _fit_head(batch_size_key="head.batch_size")


def test_run_inference_out_of_memory_names_the_key_and_without_one_lists_them(monkeypatch):
    monkeypatch.setattr(nn.Linear, "forward", _raising(RuntimeError(CPU_OOM)))
    with pytest.raises(OutOfMemory, match="lower inference.batch_size in params.yaml"):
        run_inference(nn.Linear(4, 3), _batches(), CPU, batch_size_key="inference.batch_size")
    with pytest.raises(OutOfMemory) as raised:
        run_inference(nn.Linear(4, 3), _batches(), CPU)
    for key in ("head.batch_size", "finetune.batch_size", "inference.batch_size"):
        assert key in str(raised.value)


def test_other_runtime_errors_are_not_called_out_of_memory(monkeypatch):
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x4 and 5x3)")
    monkeypatch.setattr(nn.Linear, "forward", _raising(error))
    with pytest.raises(RuntimeError) as raised:
        _fit_head(batch_size_key="finetune.batch_size")
    assert raised.value is error


def test_train_head_out_of_memory_exits_1_and_writes_no_model(
    tmp_path, monkeypatch, params_dict, write_params, stage_run
):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, params_dict)
    _tiny_features(tmp_path / "features")
    monkeypatch.setattr(nn.Linear, "forward", _raising(torch.cuda.OutOfMemoryError(CUDA_OOM)))

    code, errors = stage_run(load_stage("train_head").main, ["features", "head.pt", "live"])
    assert code == 1
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert "out of memory" in errors[0] and "head.batch_size" in errors[0]
    assert not (tmp_path / "head.pt").exists()
    assert list(tmp_path.glob(".head.pt.*")) == []


@pytest.fixture(scope="module")
def head_trained(tmp_path_factory, image_folder_factory, params_factory, write_params) -> Path:
    """prepare -> extract -> train_head in a fresh folder (what finetune needs)."""
    work = tmp_path_factory.mktemp("oom")
    image_folder_factory(work / "images")
    write_params(work, params_factory())
    run_stages(work, ["prepare", "extract", "train_head"])
    return work


def test_finetune_out_of_memory_exits_1_and_writes_no_model(head_trained, monkeypatch, stage_run):
    monkeypatch.chdir(head_trained)
    monkeypatch.setattr(Classifier, "forward", _raising(torch.cuda.OutOfMemoryError(CUDA_OOM)))
    argv = ["images", "data/prepared", "models/head.pt", "models/finetuned.pt", "dvclive/ft"]

    code, errors = stage_run(load_stage("finetune").main, argv)
    assert code == 1
    assert len(errors) == 1 and "\n" not in errors[0], errors
    # The first forward pass validates the probe fine-tuning starts from (epoch 0).
    assert errors[0].startswith("finetune validation: out of memory on cpu with batches of 8")
    assert "finetune.batch_size" in errors[0]
    assert sorted(os.listdir(head_trained / "models")) == ["head.pt"]


def test_extract_out_of_memory_exits_1_and_writes_no_features(head_trained, monkeypatch, stage_run):
    monkeypatch.chdir(head_trained)
    monkeypatch.setattr(Backbone, "forward", _raising(RuntimeError(CPU_OOM)))

    code, errors = stage_run(load_stage("extract").main, ["images", "data/prepared", "again"])
    assert code == 1
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert "out of memory" in errors[0] and "inference.batch_size" in errors[0]
    assert not (head_trained / "again").exists()
    assert list(head_trained.glob(".again.*")) == []
    # The features of the earlier run are untouched.
    assert json.loads((head_trained / "data/features/meta.json").read_text())["classes"]


def test_outputs_get_normal_permissions(tmp_path):
    """Temporary files are created 0600 (files) and 0700 (folders); finished outputs must get
    the usual umask-based modes, or a shared DVC cache or colleague cannot read them."""
    import os
    import stat

    from headstart.io import atomic_dir, write_json

    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        with atomic_dir(tmp_path / "folder") as folder:
            write_json(folder / "inner.json", {"b": 2})
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "folder" / "inner.json").stat().st_mode) == 0o644


def test_a_successful_stage_reports_its_time_and_peak_memory(stage_run, caplog):
    def allocate(argv):
        buffer = bytearray(64 << 20)  # 64 MiB, touched
        buffer[::4096] = b"x" * len(buffer[::4096])

    assert stage_run(allocate, []) == (0, [])
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done in")]
    peak = float(line.split("peak memory ")[1].split(" MiB")[0])
    assert peak >= 64
