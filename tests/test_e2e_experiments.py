"""Experiments and reproducibility with the real `dvc`: a queued sweep, run by two queue
workers at once, that reuses the features, one of its experiments then applied, committed and
diffed; a push / clone / pull round trip through a local remote (run-cache included); and a
from-scratch rerun (tools/reproduce_check.py) that is byte for byte the same.

Every test copies the run's baseline repository (conftest.dvc_baseline: all stages run once,
committed), so the whole pipeline runs from scratch only once in this file, in the
reproduce-check test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from test_e2e_dvc import (
    FAST,
    PROJECT,
    _copy_repo,
    _env,
    _set_params,
    main_stages,
    pipeline_stages,
    ran_stages,
    run,
)

from headstart.model import load_classifier

pytestmark = pytest.mark.e2e

# DVC's line for a stage restored from the run-cache instead of run.
CACHED = "Stage '{}' is cached - skipping run, checking out outputs"
# Every stage of the project's pipeline: what a run from scratch runs.
UP_TO_DATE = "Data and pipelines are up to date."


def _git_clone(source: Path, target: Path) -> Path:
    run(source.parent, "git", "clone", "-q", str(source), str(target))
    return target


def _lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())


def _out_hashes(lock: dict) -> dict[str, str]:
    """{output path: md5} for every output of every stage in a parsed dvc.lock."""
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage["outs"]}


def _metrics_files(repo: Path) -> list[str]:
    return yaml.safe_load((repo / "dvc.yaml").read_text())["metrics"]


def _start_the_queue(repo: Path, jobs: int, log: Path) -> None:
    """`dvc queue start -j jobs`, its output to a file: the workers it spawns keep its stdout
    and stderr open for as long as they live, so a pipe (capture_output) would wait for them."""
    with open(log, "w") as out:
        command = ["dvc", "queue", "start", "-j", str(jobs)]
        started = subprocess.run(command, cwd=repo, env=_env(repo), stdout=out, stderr=out)
    output = log.read_text()
    assert started.returncode == 0, output
    assert f"Started '{jobs}' new experiments task queue workers" in output, output


def _running_experiments(repo: Path) -> int:
    """How many of the repository's queued experiments are running now: each runs in its own
    `dvc exp exec-run --infofile <repo>/.dvc/tmp/exps/...` process, started by a queue worker."""
    roots = (str(repo), os.path.realpath(repo))
    count = 0
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "exec-run" in cmdline and any(arg.startswith(roots) for arg in cmdline):
            count += 1
    return count


def _wait_for_the_queue(repo: Path, count: int, timeout: float) -> tuple[dict[str, str], int]:
    """Wait until `dvc queue status` lists `count` tasks, none of them queued or running.
    Returns {task: final status} and the most experiments seen running at once. (`dvc queue
    start` returns at once and has no --wait.) The process table is read every second; `dvc
    queue status` (seconds of CPU on a busy machine, taken from the experiments) is asked
    only while none runs."""
    deadline = time.monotonic() + timeout
    most_running = 0
    while True:
        running = _running_experiments(repo)
        most_running = max(most_running, running)
        if running and time.monotonic() < deadline:
            time.sleep(1)
            continue
        status = run(repo, "dvc", "queue", "status")
        # Task     Name        Created    Status
        # 0349bd9  ahead-mina  10:35 AM   Running
        rows = [line.split() for line in status.splitlines()]
        tasks = {row[0]: row[-1] for row in rows if row and re.fullmatch(r"[0-9a-f]{7}", row[0])}
        most_running = max(most_running, list(tasks.values()).count("Running"))
        if len(tasks) == count and not {"Queued", "Running"} & set(tasks.values()):
            return tasks, most_running
        if time.monotonic() > deadline:
            pytest.fail(f"the queue did not finish in {timeout:.0f} s:\n{status}")
        time.sleep(2)


def _stop_the_queue(repo: Path) -> None:
    """`dvc queue stop --kill`, then SIGKILL any of the repository's queue workers still alive
    after 15 s. A DVC 3.67 worker whose idle monitor gets no timely answer from it (a busy
    machine) stops monitoring while it is still running a task, and then ignores every
    shutdown, `dvc queue stop` included: left alone it would idle on after the test."""
    command = ["dvc", "queue", "stop", "--kill"]
    subprocess.run(command, cwd=repo, env=_env(repo), capture_output=True, timeout=120)
    workers = []
    for pid_file in (repo / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.pid"):
        with contextlib.suppress(psutil.NoSuchProcess):
            worker = psutil.Process(int(pid_file.read_text()))
            if "queue-worker" in worker.cmdline():
                workers.append(worker)
    _, alive = psutil.wait_procs(workers, timeout=15)
    for worker in alive:
        worker.kill()


def test_queued_sweep_runs_two_experiments_in_parallel_reusing_the_features(dvc_baseline, tmp_path):
    """A sweep of two head experiments, queued, then run by two queue workers at once (`dvc
    queue start -j 2`), each in its own temporary workspace: neither re-extracts features, and
    each records its own results. One of them applied to the workspace is up to date (nothing
    runs); committed, `dvc metrics diff` and `dvc params diff` show exactly what changed."""
    repo = _copy_repo(dvc_baseline, tmp_path / "repo")
    epochs = FAST["head.epochs"] + 3  # fewer than head.patience: every epoch runs
    queued = run(
        repo,
        "dvc",
        "exp",
        "run",
        "--queue",
        "-S",
        "head.lr=1.0e-3,1.0e-2",
        "-S",
        f"head.epochs={epochs}",
    )
    assert queued.count("Queued experiment") == 2, queued

    try:
        _start_the_queue(repo, 2, tmp_path / "queue-start.log")
        tasks, most_running = _wait_for_the_queue(repo, 2, timeout=300)
    finally:  # no worker outlives the test, whatever happened
        _stop_the_queue(repo)
    assert sorted(tasks.values()) == ["Success", "Success"], tasks
    assert most_running == 2, "the two experiments never ran at the same time"
    for task in tasks:
        log = run(repo, "dvc", "queue", "logs", task)
        assert main_stages(log) == {"train_head", "finetune", "evaluate", "export"}, log
        assert "Stage 'extract' didn't change, skipping" in log, log
        assert "Stage 'prepare' didn't change, skipping" in log, log

    # The results, as `dvc exp show` reports them.
    baseline_commit = next(
        row
        for row in json.loads(run(repo, "dvc", "exp", "show", "--json"))
        if row["rev"] != "workspace"
    )
    revs = [rev for exp in baseline_commit["experiments"] for rev in exp["revs"]]
    experiments = [rev["data"] for rev in revs]
    assert sorted(e["params"]["params.yaml"]["data"]["head"]["lr"] for e in experiments) == [
        1.0e-3,
        1.0e-2,
    ]
    features = baseline_commit["data"]["outs"]["data/features"]["hash"]
    for experiment in experiments:
        assert experiment["deps"]["data/features"]["hash"] == features
        assert experiment["outs"]["data/features"]["hash"] == features
        evaluated = experiment["metrics"]["metrics/evaluate.json"]["data"]
        for model in ("head", "finetuned"):
            assert 0.0 <= evaluated[model]["accuracy"] <= 1.0
    # Different learning rates, different heads: the training curves differ.
    head_losses = {
        e["metrics"]["dvclive/train_head/metrics.json"]["data"]["train_loss"] for e in experiments
    }
    assert len(head_losses) == 2, head_losses
    head_models = {e["outs"]["models/head.pt"]["hash"] for e in experiments}
    assert (
        len(head_models) == 2
        and baseline_commit["data"]["outs"]["models/head.pt"]["hash"] not in head_models
    )

    # One experiment in the workspace: its outputs are checked out, nothing needs to run.
    baseline_step = json.loads((repo / "dvclive/train_head/metrics.json").read_text())["step"]
    chosen = next(
        r for r in revs if r["data"]["params"]["params.yaml"]["data"]["head"]["lr"] == 1.0e-2
    )
    run(repo, "dvc", "exp", "apply", chosen["rev"])
    again = run(repo, "dvc", "repro")
    assert ran_stages(again) == set(), again
    assert UP_TO_DATE in run(repo, "dvc", "status")
    run(repo, "git", "commit", "-q", "-am", "a faster head, trained longer")

    metrics = json.loads(run(repo, "dvc", "metrics", "diff", "HEAD~1", "HEAD", "--json"))
    step = metrics["dvclive/train_head/metrics.json"]["step"]
    assert step == {"old": baseline_step, "new": epochs - 1, "diff": 3}, metrics
    # Only changed metrics are listed; the data did not change.
    assert "metrics/data.json" not in metrics
    table = run(repo, "dvc", "metrics", "diff", "HEAD~1", "HEAD")
    assert "dvclive/train_head/metrics.json" in table and "step" in table

    params = json.loads(run(repo, "dvc", "params", "diff", "HEAD~1", "HEAD", "--json"))
    lr = yaml.safe_load((PROJECT / "params.yaml").read_text())["head"]["lr"]
    assert params == {
        "params.yaml": {
            "head.epochs": {"old": epochs - 3, "new": epochs, "diff": 3},
            "head.lr": {"old": lr, "new": 1.0e-2, "diff": pytest.approx(1.0e-2 - lr)},
        }
    }


def test_two_queued_extractions_sharing_the_store_write_what_each_writes_alone(
    dvc_baseline, tmp_path, store_root, monkeypatch
):
    """Two queued experiments that both extract (1 and 2 loader processes: one features key),
    run at once by `dvc queue start -j 2` in their temporary copies against one empty store:
    both succeed, the store holds one whole entry per image, and each wrote the features that
    an extraction alone, from scratch, writes."""
    repo = _copy_repo(dvc_baseline, tmp_path / "repo")
    queued = run(repo, "dvc", "exp", "run", "--queue", "-S", "compute.num_workers=1,2", "extract")
    assert queued.count("Queued experiment") == 2, queued
    try:
        _start_the_queue(repo, 2, tmp_path / "queue-start.log")
        tasks, most_running = _wait_for_the_queue(repo, 2, timeout=300)
    finally:  # no worker outlives the test, whatever happened
        _stop_the_queue(repo)
    assert sorted(tasks.values()) == ["Success", "Success"], tasks
    assert most_running == 2, "the two experiments never ran at the same time"
    for task in tasks:
        assert "Running stage 'extract'" in run(repo, "dvc", "queue", "logs", task)
    entries = [p for p in (store_root / "features").rglob("*/??/*") if p.is_file()]
    assert len(entries) == 36 and not [p for p in entries if p.name.endswith(".tmp")]

    # From scratch: no store, and --force past the run-cache entry the queued run left.
    monkeypatch.setenv("HEADSTART_CACHE", "off")
    alone = run(repo, "dvc", "exp", "run", "--force", "-S", "compute.num_workers=1", "extract")
    assert "Running stage 'extract'" in alone
    rows = json.loads(run(repo, "dvc", "exp", "show", "--json"))
    workspace = next(row for row in rows if row["rev"] == "workspace")
    scratch = workspace["data"]["outs"]["data/features"]["hash"]
    baseline = next(row for row in rows if row["rev"] != "workspace")
    experiments = [rev["data"] for exp in baseline["experiments"] for rev in exp["revs"]]
    queued_runs = [
        e
        for e in experiments
        if e["params"]["params.yaml"]["data"]["compute"]["num_workers"] in (1, 2)
    ]
    assert len(queued_runs) >= 2, experiments
    for experiment in queued_runs:
        assert experiment["outs"]["data/features"]["hash"] == scratch
    assert baseline["data"]["outs"]["data/features"]["hash"] == scratch  # 0 loader processes


def test_push_clone_pull_is_up_to_date_and_the_run_cache_travels(dvc_baseline, tmp_path):
    """Machine A pushes; machine B (a fresh git clone) pulls and has nothing to run, and its
    models give the recorded metrics. Machine C reuses, from the remote's run-cache, a run that
    A made but never committed."""
    machine_a = _copy_repo(dvc_baseline, tmp_path / "a")
    remote = tmp_path / "remote"
    run(machine_a, "dvc", "remote", "add", "-d", "shared", str(remote))
    run(machine_a, "git", "commit", "-q", "-am", "shared remote")
    run(machine_a, "dvc", "push", "--run-cache")

    machine_b = _git_clone(machine_a, tmp_path / "b")
    assert not (machine_b / "models" / "finetuned.pt").exists()
    run(machine_b, "dvc", "pull")
    assert UP_TO_DATE in run(machine_b, "dvc", "status")
    assert ran_stages(run(machine_b, "dvc", "repro")) == set()
    assert _lock(machine_b) == _lock(machine_a)
    for name in ("models/head.pt", "models/finetuned.pt", "data/features/meta.json"):
        assert (machine_b / name).read_bytes() == (machine_a / name).read_bytes(), name
    model, meta = load_classifier(machine_b / "models" / "finetuned.pt")
    assert meta["classes"] == ["bird", "cat", "dog"]
    # The pulled models, evaluated again on B, give exactly the committed metrics.
    recorded = {name: (machine_b / name).read_bytes() for name in _metrics_files(machine_b)}
    evaluated = run(machine_b, "dvc", "repro", "--force", "--single-item", "evaluate")
    assert ran_stages(evaluated) == {"evaluate"}, evaluated
    for name, content in recorded.items():
        assert (machine_b / name).read_bytes() == content, name
    assert UP_TO_DATE in run(machine_b, "dvc", "status")

    # C has the run-cache and the images, no outputs: a stage whose outputs are all in the DVC
    # cache is restored from it (extract); a stage with git-tracked outputs runs (prepare), as
    # `dvc push --run-cache` does not send those (see _not_restorable_elsewhere).
    machine_c = _git_clone(machine_a, tmp_path / "c")
    not_cached = _not_restorable_elsewhere(machine_c)
    assert "extract" not in not_cached
    run(machine_c, "dvc", "fetch", "--run-cache")
    run(machine_c, "dvc", "checkout", "data/raw.dvc")
    restored = run(machine_c, "dvc", "repro", "extract")
    _assert_ran_or_restored(restored, {"prepare", "extract"}, not_cached)
    for name in ("data/prepared/index.csv", "data/features/meta.json"):
        assert (machine_c / name).read_bytes() == (machine_a / name).read_bytes(), name

    # A runs a variant without committing it and pushes its run-cache; C asks for the same
    # variant. Whatever runs again on C gives byte for byte what it gave on A. (A fine-tune
    # variant: the costliest stage with git-tracked curves, and the fewest stages after it.)
    variant = {"finetune.epochs": FAST["finetune.epochs"] + 1}
    _set_params(machine_a, variant)
    assert main_stages(run(machine_a, "dvc", "repro")) == {"finetune", "evaluate", "export"}
    run(machine_a, "dvc", "push", "--run-cache")
    _set_params(machine_c, variant)
    rerun = run(machine_c, "dvc", "repro", "--pull")
    _assert_ran_or_restored(rerun, {"finetune", "evaluate", "export"}, not_cached)

    assert _lock(machine_c) == _lock(machine_a)
    assert UP_TO_DATE in run(machine_c, "dvc", "status")

    # On A itself, back to the committed params: everything but evaluate comes back from the
    # local run-cache, git-tracked curves and metrics included.
    _set_params(machine_a, {"finetune.epochs": FAST["finetune.epochs"]})
    back = run(machine_a, "dvc", "repro")
    _assert_ran_or_restored(
        back, {"finetune", "evaluate", "export"}, set(_not_run_cached(machine_a))
    )
    assert _lock(machine_a) == _lock(machine_b)


def _timed_outputs() -> set[str]:
    """The baseline's outputs that hold timings (tools/reproduce_check.TIMED_OUTPUTS)."""
    return {
        "metrics/backbones.json",
        "plots/backbones.json",
        *(f"data/compare/{name}" for name in FAST["compare.backbones"]),
    }


def _not_run_cached(repo: Path) -> dict[str, list[str]]:
    """{stage: its `cache: false` outputs declared under `outs:`}: the stages DVC 3.67 never
    saves to the run-cache. Stage.run skips the run-cache for a stage with an uncached output
    that is not one of the stage's own `metrics:` or `plots:`."""
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    blocked = {}
    for name, stage in pipeline["stages"].items():
        uncached = [
            next(iter(out))
            for out in stage.get("outs", [])
            if isinstance(out, dict) and next(iter(out.values())).get("cache") is False
        ]
        if uncached:
            blocked[name] = uncached
    return blocked


def _not_restorable_elsewhere(repo: Path) -> set[str]:
    """The stages another machine cannot restore from a pushed run-cache: those with any
    `cache: false` output (outs, metrics or plots). `dvc push --run-cache` sends the run-cache
    entries and the DVC-cached outputs, not the git-tracked ones, and a restore needs all."""
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    blocked = set()
    for name, stage in pipeline["stages"].items():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                if isinstance(out, dict) and next(iter(out.values())).get("cache") is False:
                    blocked.add(name)
    return blocked


def _assert_ran_or_restored(output: str, stages: set[str], not_cached: set[str]) -> None:
    """Each stage ran if DVC cannot run-cache it, else was restored from the run-cache (the
    leaderboard's stages aside: see main_stages)."""
    assert main_stages(output) == stages & not_cached, output
    for stage in stages - not_cached:
        assert CACHED.format(stage) in output, output


def test_every_costly_stage_is_run_cacheable():
    """Static: every stage that costs more than seconds can be restored from the run-cache;
    its git-tracked files are stage `metrics:` / `plots:`, not `cache: false` outs (DVC 3.67's
    Stage.run saves no run-cache entry for a stage with such an out). evaluate keeps its (the
    model card, calibration, pictures), and so does audit (its Markdown summary and CSV
    reports): they take seconds on the committed data (the audit about 5 s, 155 s at 50,000
    images, where extraction takes hours) and are recomputed. Export (tens of seconds) keeps
    both its outputs in the DVC cache."""
    assert set(_not_run_cached(PROJECT)) == {"audit", "evaluate"}


def test_a_rerun_from_scratch_is_byte_identical_and_reproduce_check_flags_an_edit(
    dvc_baseline, tmp_path
):
    """tools/reproduce_check.py on a commit whose head accuracy was edited by hand. Its rerun
    from scratch (same commit, same machine, a clone with no outputs and an empty cache: every
    stage runs) is byte for byte the baseline run: every hash in dvc.lock (data, features,
    models, curves, metrics, plots), the whole dvc.lock, and every git-tracked file but the
    edited one, which comes back as the baseline wrote it. The check matches every other metric
    exactly and every output in dvc.lock, and flags the edited value (exit 1)."""
    repo = _copy_repo(dvc_baseline, tmp_path / "repo")
    evaluate = repo / "metrics" / "evaluate.json"
    metrics = json.loads(evaluate.read_text())
    metrics["head"]["accuracy"] = round(metrics["head"]["accuracy"] + 0.5, 6) % 1.0
    evaluate.write_text(json.dumps(metrics))
    run(repo, "git", "commit", "-q", "-am", "edited by hand")

    # --keep, with the temporary folder under tmp_path: the rerun is inspected below.
    result = subprocess.run(
        [sys.executable, str(PROJECT / "tools" / "reproduce_check.py"), "--keep"],
        cwd=repo,
        env={**_env(repo), "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert ran_stages(output) == pipeline_stages(repo), output
    rows = [line.split() for line in output.splitlines() if line.endswith((" ok", " DIFF"))]
    assert [row[:2] for row in rows if row[-1] == "DIFF"] == [
        ["metrics/evaluate.json", "head.accuracy"]
    ], output
    assert len(rows) > 20  # every metric of the four files
    assert "1 of" in output and "metrics not reproduced exactly" in output
    outputs = len(_out_hashes(_lock(repo)))
    assert f"all {outputs} outputs byte-identical to dvc.lock" in output, output

    clone = Path(re.search(r"^kept the clone in (.+)$", output, re.MULTILINE).group(1))
    assert clone.is_relative_to(tmp_path), clone
    # The leaderboard's extraction timings are measurements, not results: their files aside,
    # the rerun is byte for byte the baseline.
    timed = _timed_outputs()
    untimed = {k: v for k, v in _out_hashes(_lock(clone)).items() if k not in timed}
    assert untimed == {k: v for k, v in _out_hashes(_lock(dvc_baseline)).items() if k not in timed}
    changed = set(run(clone, "git", "diff", "--name-only").split())
    assert changed - timed - {"dvc.lock"} == {"metrics/evaluate.json"}, changed
    restored = (clone / "metrics" / "evaluate.json").read_bytes()
    assert restored == (dvc_baseline / "metrics" / "evaluate.json").read_bytes()
