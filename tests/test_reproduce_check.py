"""tools/reproduce_check.py: the comparison of committed and reproduced metrics.

The rerun itself (clone, dvc repro) is exercised end to end in test_e2e_experiments.py.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_e2e_dvc import _env, run

PROJECT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "reproduce_check", PROJECT / "tools" / "reproduce_check.py"
)
check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = check  # dataclasses look their module up there
_spec.loader.exec_module(check)

EVALUATE = {
    "head": {"accuracy": 0.9379310344827586, "macro_f1": 0.940291},
    "finetuned": {"accuracy": 0.986207, "macro_f1": 0.986761},
    "test_images": 290,
}
DATA = {"images": 1797, "classes": 10, "skipped": 0}


def _committed() -> dict:
    return copy.deepcopy({"metrics/evaluate.json": EVALUATE, "metrics/data.json": DATA})


def _with(path: str, dotted: str, value) -> dict:
    """The committed metrics with one value changed."""
    metrics = _committed()
    *parents, key = dotted.split(".")
    node = metrics[path]
    for parent in parents:
        node = node[parent]
    node[key] = value
    return metrics


def _failed(rows) -> list[tuple[str, str]]:
    return [(row.path, row.name) for row in rows if not row.ok]


def test_flatten_names_leaves_as_dvc_does():
    assert check.flatten(EVALUATE) == {
        "head.accuracy": 0.9379310344827586,
        "head.macro_f1": 0.940291,
        "finetuned.accuracy": 0.986207,
        "finetuned.macro_f1": 0.986761,
        "test_images": 290,
    }
    assert check.flatten({"a": [1, {"b": 2}]}) == {"a.0": 1, "a.1.b": 2}


def test_identical_metrics_pass_exactly():
    rows = check.compare(_committed(), _committed())
    assert len(rows) == 8 and all(row.ok for row in rows)
    assert [row.path for row in rows[:5]] == ["metrics/evaluate.json"] * 5  # file order kept


def test_exact_mode_fails_on_the_last_digit():
    reproduced = _with("metrics/evaluate.json", "head.accuracy", 0.9379310344827587)
    assert _failed(check.compare(_committed(), reproduced)) == [
        ("metrics/evaluate.json", "head.accuracy")
    ]


# -0.01: 0.986207 - 0.01 is 0.01000000000000001 away in floats, and still passes.
@pytest.mark.parametrize(("delta", "ok"), [(0.009, True), (-0.01, True), (0.0101, False)])
def test_tolerance_is_absolute_on_floats(delta, ok):
    reproduced = _with("metrics/evaluate.json", "finetuned.accuracy", 0.986207 + delta)
    rows = check.compare(_committed(), reproduced, tolerance=0.01)
    assert (not _failed(rows)) is ok


def test_integers_must_match_even_with_a_tolerance():
    reproduced = _with("metrics/evaluate.json", "test_images", 289)
    rows = check.compare(_committed(), reproduced, tolerance=5.0)
    assert _failed(rows) == [("metrics/evaluate.json", "test_images")]


def test_a_missing_metric_or_file_fails():
    reproduced = _committed()
    del reproduced["metrics/evaluate.json"]["head"]["macro_f1"]
    assert _failed(check.compare(_committed(), reproduced, tolerance=1.0)) == [
        ("metrics/evaluate.json", "head.macro_f1")
    ]
    missing_file = {"metrics/evaluate.json": EVALUATE, "metrics/data.json": None}
    assert len(_failed(check.compare(_committed(), missing_file))) == len(DATA)
    new_metric = _with("metrics/data.json", "corrupt", 1)
    assert _failed(check.compare(_committed(), new_metric)) == [("metrics/data.json", "corrupt")]


def test_nan_matches_only_nan():
    assert check.within(float("nan"), float("nan"), 0.1)
    assert not check.within(float("nan"), 0.5, 0.1)
    assert not check.within("a", "b", 1.0) and check.within("a", "a", 0.0)


def test_table_shows_every_digit_and_marks_differences():
    reproduced = _with("metrics/evaluate.json", "head.accuracy", 0.9344827586206896)
    text = check.table(check.compare(_committed(), reproduced, tolerance=0.001))
    lines = text.splitlines()
    assert lines[0].split() == ["Path", "Metric", "Committed", "Reproduced", "Difference"]
    (changed,) = [line for line in lines if "head.accuracy" in line]
    assert changed.split() == [
        "metrics/evaluate.json",
        "head.accuracy",
        "0.9379310344827586",
        "0.9344827586206896",
        "-0.00344828",
        "DIFF",
    ]
    (same,) = [line for line in lines if "test_images" in line]
    assert same.split() == ["metrics/evaluate.json", "test_images", "290", "290", "ok"]


def test_metrics_files_are_the_metrics_of_dvc_yaml():
    """The top-level `metrics:` and each stage's own, a matrix stage's once per candidate."""
    assert check.metrics_files(PROJECT) == [
        "metrics/evaluate.json",
        "metrics/data.json",
        "metrics/audit.json",
        "metrics/compare/efficientnet_lite0/head.json",
        "metrics/compare/efficientnet_lite1/head.json",
        "metrics/compare/efficientnet_lite2/head.json",
        "metrics/backbones.json",
        "dvclive/train_head/metrics.json",
        "dvclive/finetune/metrics.json",
    ]


def test_committed_metrics_are_read_from_the_commit(tmp_path):
    repo = tmp_path / "repo"
    (repo / "metrics").mkdir(parents=True)
    (repo / "metrics" / "evaluate.json").write_text(json.dumps(EVALUATE))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "metrics"], cwd=repo, check=True)
    (repo / "metrics" / "evaluate.json").write_text("{}")  # the rerun overwrote it
    found = check.committed_metrics(repo, "HEAD", ["metrics/evaluate.json", "metrics/x.json"])
    assert found == {"metrics/evaluate.json": EVALUATE, "metrics/x.json": None}


def test_negative_tolerance_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        check.main(["--tolerance", "-0.1"])
    assert exit_info.value.code == 2
    assert "--tolerance must be >= 0" in capsys.readouterr().err


def test_changed_outputs_are_found_in_dvc_lock():
    lock = {
        "schema": "2.0",
        "stages": {
            "extract": {"outs": [{"path": "data/features", "md5": "a.dir"}]},
            "train_head": {
                "outs": [
                    {"path": "models/head.pt", "md5": "b"},
                    {"path": "dvclive/train_head", "md5": "c.dir"},
                ]
            },
        },
    }
    committed = check.output_hashes(lock)
    assert committed == {
        "data/features": "a.dir",
        "models/head.pt": "b",
        "dvclive/train_head": "c.dir",
    }
    assert check.changed_outputs(committed, dict(committed)) == []
    reproduced = {**committed, "models/head.pt": "x"}
    del reproduced["dvclive/train_head"]
    assert check.changed_outputs(committed, reproduced) == ["models/head.pt", "dvclive/train_head"]
    assert check.output_hashes(None) == {}


def _tiny_dvc_repo(tmp_path: Path, script: str) -> Path:
    """A git + DVC repository with one stage, `python make.py`, that writes metrics.json (a
    git-tracked metric) and model.bin (a cached output); run once and committed."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "make.py").write_text(script)
    (repo / "dvc.yaml").write_text(
        "stages:\n"
        "  make:\n"
        "    cmd: python make.py\n"
        "    deps: [make.py]\n"
        "    outs: [model.bin, {metrics.json: {cache: false}}]\n"
        "metrics: [metrics.json]\n"
    )
    run(repo, "git", "init", "-q")
    run(repo, "dvc", "init", "-q")
    run(repo, "dvc", "repro")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "run")
    return repo


def _check(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(PROJECT / "tools" / "reproduce_check.py"), *args],
        cwd=repo,
        env=_env(repo),
        capture_output=True,
        text=True,
        timeout=300,
    )


DETERMINISTIC = """
import json
open("model.bin", "wb").write(b"weights")
json.dump({"accuracy": 0.75, "images": 8}, open("metrics.json", "w"))
"""
# A different accuracy (by less than 0.01) and model on every run.
NOISY = """
import json, os
noise = (1 + int.from_bytes(os.urandom(2), "big")) / 2**16 / 200  # in (0, 0.005]
open("model.bin", "wb").write(os.urandom(8))
json.dump({"accuracy": 0.75 + noise, "images": 8}, open("metrics.json", "w"))
"""


@pytest.mark.e2e
def test_a_deterministic_pipeline_reproduces_exactly(tmp_path):
    result = _check(_tiny_dvc_repo(tmp_path, DETERMINISTIC))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Running stage 'make'" in result.stdout  # --force: rerun, not skipped
    assert "all 2 metrics reproduced exactly" in result.stdout
    assert "all 2 outputs byte-identical to dvc.lock" in result.stdout


@pytest.mark.e2e
def test_a_noisy_pipeline_fails_exact_and_passes_within_its_tolerance(tmp_path):
    repo = _tiny_dvc_repo(tmp_path, NOISY)
    exact = _check(repo)
    assert exact.returncode == 1, exact.stdout + exact.stderr
    assert "1 of 2 metrics not reproduced exactly" in exact.stdout
    assert "2 outputs differ from dvc.lock: metrics.json, model.bin" in exact.stdout
    tolerant = _check(repo, "--tolerance", "0.01")
    assert tolerant.returncode == 0, tolerant.stdout + tolerant.stderr
    assert "all 2 metrics reproduced within 0.01" in tolerant.stdout


@pytest.mark.e2e
def test_a_failing_rerun_exits_2_and_keeps_its_log(tmp_path):
    repo = _tiny_dvc_repo(tmp_path, DETERMINISTIC)
    (repo / "make.py").write_text("raise SystemExit('broken on purpose')\n")
    run(repo, "git", "commit", "-q", "-am", "break it")
    result = _check(repo)
    assert result.returncode == 2, result.stdout + result.stderr
    kept = Path(result.stderr.split("kept the clone and its log in ")[1].split()[0])
    try:
        assert "broken on purpose" in (kept / "repro.log").read_text()
    finally:
        shutil.rmtree(kept)
