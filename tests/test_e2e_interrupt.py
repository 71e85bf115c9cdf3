"""An interrupted stage under the real `dvc repro` records nothing, and a rerun heals it.

DVC writes a stage's entry in dvc.lock only when the stage's command exits 0. So a fine-tune
interrupted with Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or killed
outright (SIGKILL to the stage's python alone, as `kill -9` or the OOM killer does) must leave
dvc.lock byte-identical, keep `dvc status` dirty, and the next `dvc repro` must produce exactly
what an uninterrupted run with the same params produces (whole dvc.lock, model, metrics).

The session's baseline repository (conftest.dvc_baseline: all stages run, 2 fine-tune epochs)
is copied for each case; each copy then raises finetune.epochs, so only finetune, evaluate and
export run. Every case checks that nothing was recorded; the SIGKILL case, whose stage leaves
a partial output on disk (the Ctrl-C cases leave less), then reruns and compares.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from test_e2e_dvc import _copy_repo, _env, _set_params, ran_stages, run

pytestmark = pytest.mark.e2e

# Long enough that the run is still training when the signal arrives after epoch 1: on one
# torch thread an epoch here takes 20-150 ms, so 40 epochs leave the test a second or more to
# react (it takes milliseconds). patience = epochs, so an uninterrupted run trains them all.
EPOCHS = 40
LONG = {"finetune.epochs": EPOCHS, "finetune.patience": EPOCHS}
FIRST_EPOCH = f"finetune epoch 1/{EPOCHS}:"
# What an uninterrupted run and a healed rerun must agree on, byte for byte. dvc.lock holds the
# md5 of every dependency and output (dvclive/finetune included: each epoch's curves).
RESULTS = (
    "dvc.lock",
    "models/finetuned.pt",
    "dvclive/finetune/metrics.json",
    "metrics/evaluate.json",
    "metrics/per_class.json",
    "plots/confusion_finetuned.json",
    "reports/model_card.md",
    "models/finetuned.calibration.json",
    "models/finetuned.onnx",
)


def _results(repo: Path) -> dict[str, bytes]:
    return {name: (repo / name).read_bytes() for name in RESULTS}


def _sigint_as_in_a_terminal() -> None:
    """SIGINT back to its default in `dvc repro`, as in a terminal: a shell starts background
    commands (`make test &` in a script) with SIGINT ignored, every child inherits that, and a
    Python started with SIGINT ignored never raises KeyboardInterrupt: no Ctrl-C to test."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def _repro_in_background(
    repo: Path, log: Path, shell: str = "/bin/sh"
) -> Iterator[subprocess.Popen]:
    """`dvc repro` in its own session (its pid is the process group id), output to `log`,
    running each stage's cmd with `shell`.

    Whatever happens, every process left in that group is SIGKILLed on the way out.
    """
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["dvc", "repro"],
            cwd=repo,
            env={**_env(repo), "SHELL": shell},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_sigint_as_in_a_terminal,
        )
    try:
        yield proc
    finally:
        leftovers = []
        with contextlib.suppress(psutil.NoSuchProcess):
            leftovers = psutil.Process(proc.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for child in leftovers:  # anything that left the group
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        proc.wait(timeout=30)


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            pytest.fail(f"dvc repro ended (rc {proc.returncode}) before {text!r}:\n{_tail(log)}")
        time.sleep(0.02)
    pytest.fail(f"no {text!r} after {timeout:.0f} s:\n{_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-6000:]


def _finetune_process(dvc: subprocess.Popen) -> psutil.Process:
    """The python process running stages/finetune.py (not the shell DVC may start it with)."""
    for child in psutil.Process(dvc.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            cmdline = child.cmdline()
            if (
                cmdline
                and "python" in Path(cmdline[0]).name
                and any(arg.endswith("stages/finetune.py") for arg in cmdline)
            ):
                return child
    pytest.fail("no python process running stages/finetune.py under dvc repro")


@pytest.fixture(scope="module")
def uninterrupted(dvc_baseline, tmp_path_factory) -> dict[str, bytes]:
    """The results of the LONG params run without interruption, in a copy of the baseline."""
    repo = _copy_repo(dvc_baseline, tmp_path_factory.mktemp("uninterrupted") / "repo")
    _set_params(repo, LONG)
    output = run(repo, "dvc", "repro")
    assert ran_stages(output) == {"finetune", "evaluate", "export"}, output
    # patience == epochs: every epoch ran (DVCLive's last step is EPOCHS - 1).
    assert json.loads((repo / "dvclive/finetune/metrics.json").read_text())["step"] == EPOCHS - 1
    return _results(repo)


def _interrupted(repo: Path, log: Path, interrupt, shell: str = "/bin/sh") -> str:
    """Start `dvc repro`, call interrupt(proc) after fine-tune epoch 1, check nothing was
    recorded; return the log."""
    lock_before = (repo / "dvc.lock").read_bytes()
    with _repro_in_background(repo, log, shell) as proc:
        _wait_for(log, FIRST_EPOCH, proc)
        interrupt(proc)
        returncode = proc.wait(timeout=120)
    output = log.read_text(errors="replace")

    assert returncode != 0, output[-6000:]
    assert f"finetune epoch {EPOCHS}/{EPOCHS}:" not in output, "finished before the signal"
    assert "Running stage 'evaluate'" not in output
    # Nothing of the interrupted run was recorded: the lock still describes the baseline run...
    assert (repo / "dvc.lock").read_bytes() == lock_before
    # ...and no model was written (DVC removed the old one before running the stage).
    assert not (repo / "models" / "finetuned.pt").exists()
    assert not list((repo / "models").glob(".finetuned.pt.*.tmp"))
    status = run(repo, "dvc", "status")
    assert "finetune:" in status and "up to date" not in status, status
    return output


def _healed(repo: Path, uninterrupted: dict[str, bytes]) -> None:
    """Rerun to completion: the results are the uninterrupted run's, byte for byte."""
    rerun = run(repo, "dvc", "repro")
    assert ran_stages(rerun) == {"finetune", "evaluate", "export"}, rerun  # ran, not restored
    healed = _results(repo)
    for name in RESULTS:
        assert healed[name] == uninterrupted[name], f"{name} differs from the uninterrupted run"
    assert "up to date" in run(repo, "dvc", "status")


# What DVC reports as the stage's exit code depends on the shell it starts the cmd with: bash
# execs a single command, so DVC sees python's own 130; dash (/bin/sh on Debian) keeps waiting,
# gets the same SIGINT from the terminal and dies of it, so DVC sees -2. Either way non-zero.
@pytest.mark.parametrize(("shell", "reported"), [("/bin/sh", -2), ("/bin/bash", 130)])
def test_sigint_to_dvc_repro_records_nothing(dvc_baseline, tmp_path, shell, reported):
    """Ctrl-C: SIGINT to the process group. DVC ignores it while the stage runs; the stage
    must exit non-zero (130) rather than save what it has."""
    if not Path(shell).exists():
        pytest.fail(f"{shell} is needed for this test")
    repo = _copy_repo(dvc_baseline, tmp_path / "repo")
    _set_params(repo, LONG)

    def ctrl_c(proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGINT)

    output = _interrupted(repo, tmp_path / "repro.log", ctrl_c, shell)
    assert "interrupted (SIGINT); no output was recorded" in output  # stage.run's handler
    assert f"exited with {reported}\n" in output, output[-3000:]  # DVC's report


def test_sigkill_of_the_stage_records_nothing_and_a_rerun_matches(
    dvc_baseline, uninterrupted, tmp_path
):
    """kill -9 of the stage's python only: no handler runs, DVC sees the stage die. The curves
    written so far (a partial output) stay on disk but are not recorded."""
    repo = _copy_repo(dvc_baseline, tmp_path / "repo")
    _set_params(repo, LONG)

    curves = repo / "dvclive/finetune/plots/metrics/train_loss.tsv"

    def kill_stage(proc: subprocess.Popen) -> None:
        # Epoch 1 is logged just before DVCLive writes its curves: wait for them, so that a
        # partial output (the curves of the epochs so far) exists when the stage dies.
        deadline = time.monotonic() + 60
        while not curves.is_file() and time.monotonic() < deadline:
            time.sleep(0.02)
        stage = _finetune_process(proc)
        stage.kill()
        stage.wait(timeout=30)
        assert curves.is_file()

    output = _interrupted(repo, tmp_path / "repro.log", kill_stage)
    assert "interrupted" not in output  # SIGKILL cannot be handled
    assert "exited with -9" in output or "exited with 137" in output, output[-3000:]
    _healed(repo, uninterrupted)
