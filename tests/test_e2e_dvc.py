"""End to end with the real `dvc` in a temporary git + DVC repository.

The project's dvc.yaml, stages and library are copied into a fresh repository with a small
generated ImageFolder added with `dvc add`, as a user with their own data would do. The helpers
here serve every e2e module; conftest.dvc_baseline is such a repository, its pipeline run once
and committed, shared by the session.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

PROJECT = Path(__file__).resolve().parents[1]


def _env(repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(repo / "src")  # the copied library, the one dvc.yaml depends on
    env["DVC_NO_ANALYTICS"] = "1"
    # DVC runs each stage's cmd with $SHELL -c, or /bin/sh when SHELL is unset (as in CI).
    # Pin it so these tests see what CI sees, whatever shell the developer runs.
    env["SHELL"] = "/bin/sh"
    env.update(
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
    )
    return env


def run(repo: Path, *command: str) -> str:
    result = subprocess.run(
        command, cwd=repo, env=_env(repo), capture_output=True, text=True, timeout=900
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-6000:]}"
    return output


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def main_stages(output: str) -> set[str]:
    """The stages that ran, less the backbone leaderboard's (compare_*): they follow the head
    params too, and whether their small table reruns depends on whether a score moved."""
    return {name for name in ran_stages(output) if not name.startswith("compare")}


def pipeline_stages(repo: Path) -> set[str]:
    """Every stage of the repository's pipeline, matrix stages expanded (compare_head@NAME)."""
    return set(run(repo, "dvc", "stage", "list", "--name-only").split())


def make_repo(tmp_path: Path, image_folder: Path, overrides: dict) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", "pyproject.toml"):
        shutil.copy(PROJECT / name, repo / name)
    for name in ("stages", "src", "pretrained"):
        shutil.copytree(
            PROJECT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    shutil.copytree(image_folder, repo / "data" / "raw")
    _set_params(repo, overrides)
    run(repo, "git", "init", "-q", "-b", "main")
    run(repo, "dvc", "init", "-q")
    run(repo, "dvc", "config", "core.analytics", "false")
    shutil.copytree(PROJECT / ".dvc" / "plots", repo / ".dvc" / "plots")  # custom templates
    run(repo, "dvc", "add", "-q", "data/raw")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "project with own data")
    return repo


def _copy_repo(source: Path, target: Path) -> Path:
    """A copy of a git + DVC repository, cache included, without DVC's per-machine state."""

    def skip(directory: str, names: list[str]) -> set[str]:
        # .dvc/tmp: locks and the inode/mtime hash cache, which would not match the copy.
        return {"tmp"} if Path(directory).name == ".dvc" else set()

    shutil.copytree(source, target, symlinks=True, ignore=skip)
    return target


def _set_params(repo: Path, overrides: dict) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


FAST = {
    "data.dir": "data/raw",
    "backbone.weights": "none",
    "backbone.image_size": 32,
    "compute.num_workers": 0,
    "inference.batch_size": 16,
    "head.epochs": 5,
    "finetune.epochs": 2,
    "finetune.unfreeze": 1,
    # One leaderboard candidate, the main backbone itself: extract can reuse its features.
    "compare.backbones": ["efficientnet_lite0"],
    "compare.weights": "none",
    "compare.image_size": 32,
}


def test_baseline_metrics_and_a_head_experiment_that_runs_train_head_alone(dvc_baseline, tmp_path):
    """After a full `dvc repro` (the shared baseline): its metrics are shown, and an experiment
    on the head alone (`dvc exp run ... train_head`, as a quick sweep runs it) runs train_head
    and nothing else. (A head change through the whole pipeline, applied, committed and
    diffed: test_e2e_experiments' queued sweep.)"""
    repo = _copy_repo(dvc_baseline, tmp_path / "repo")
    metrics = json.loads((repo / "metrics" / "evaluate.json").read_text())
    for model in ("head", "finetuned"):
        assert 0.0 <= metrics[model]["accuracy"] <= 1.0
        assert 0.0 <= metrics[model]["macro_f1"] <= 1.0
    shown = run(repo, "dvc", "metrics", "show", "--json")
    assert "finetuned" in shown and "head" in shown
    baseline_step = json.loads((repo / "dvclive/train_head/metrics.json").read_text())["step"]
    assert baseline_step == FAST["head.epochs"] - 1

    # The head alone, as a quick sweep runs it: train_head and nothing after it.
    epochs = FAST["head.epochs"] + 2  # fewer than head.patience: every epoch runs
    quick = run(repo, "dvc", "exp", "run", "-S", f"head.epochs={epochs}", "train_head")
    assert ran_stages(quick) == {"train_head"}, quick
    step = json.loads((repo / "dvclive/train_head/metrics.json").read_text())["step"]
    assert step == epochs - 1


def test_own_folder_with_default_params(tmp_path, image_folder):
    """Any ImageFolder (class names with spaces, PNG and JPEG, grey and colour, odd sizes)
    runs the pipeline up to evaluate with the shipped params: the pretrained default backbone,
    auto image size. Only the data folder and the epoch counts (for time) differ."""
    renamed = tmp_path / "photos"
    shutil.copytree(image_folder, renamed)
    first_class = sorted(p for p in renamed.iterdir() if p.is_dir())[0]
    first_class.rename(renamed / "red panda (ailurus)")
    repo = make_repo(
        tmp_path, renamed, {"data.dir": "data/raw", "head.epochs": 10, "finetune.epochs": 2}
    )
    # The main chain up to the metrics (the leaderboard's three pretrained extractions are not
    # this test's, nor the export: the baseline and the timm tests run that stage).
    output = run(repo, "dvc", "repro", "evaluate")
    assert {"prepare", "extract", "train_head", "finetune", "evaluate"} <= ran_stages(output)
    meta = json.loads((repo / "data" / "features" / "meta.json").read_text())
    assert meta["backbone"]["weights"] == "pretrained"
    assert "red panda (ailurus)" in meta["classes"]
    metrics = json.loads((repo / "metrics" / "evaluate.json").read_text())
    # Class-dependent colours and patterns: a pretrained backbone separates them easily.
    assert metrics["head"]["accuracy"] >= 0.8, metrics


def test_a_data_dir_with_spaces_and_shell_syntax_reaches_the_stage_as_it_is(tmp_path, image_folder):
    """dvc.yaml passes ${data.dir} single-quoted: a folder name with spaces, $(...) and
    backticks reaches the stage as one argument, through `dvc exp run -S`, and runs nothing."""
    repo = make_repo(tmp_path, image_folder, FAST)
    weird = "data/my images $(touch PWNED) `touch PWNED2`"
    shutil.copytree(repo / "data" / "raw", repo / weird)
    run(repo, "dvc", "add", "-q", weird)
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "images in an awkwardly named folder")
    # -S takes Hydra's override grammar: a value with spaces or parentheses is quoted there.
    output = run(repo, "dvc", "exp", "run", "-S", f"data.dir='{weird}'", "prepare")
    assert ran_stages(output) == {"prepare"}
    assert not list(tmp_path.rglob("PWNED*")), "the shell ran part of the folder name"
    report = json.loads((repo / "data" / "prepared" / "report.json").read_text())
    assert report["data_dir"] == weird
    assert report["num_images"] == len([p for p in image_folder.rglob("*") if p.is_file()])


def _vega_spec(repo: Path, *command: str) -> dict:
    """The filled Vega-Lite spec DVC prints for one plot (--show-vega)."""
    return json.loads(run(repo, "dvc", "plots", *command, "--show-vega"))


def test_precision_recall_template_draws_one_line_per_class_and_revision(tmp_path):
    """The project's precision_recall template and its plot definitions in dvc.yaml, through
    the real `dvc plots show` and `dvc plots diff`: every record reaches the chart, coloured
    by class (one line each), recall on x, precision on y, and one column per revision."""
    import numpy as np

    from headstart.io import write_json
    from headstart.metrics import precision_recall_records

    repo = tmp_path / "repo"
    (repo / "plots").mkdir(parents=True)
    run(repo, "git", "init", "-q", "-b", "main")
    run(repo, "dvc", "init", "-q")
    shutil.copytree(PROJECT / ".dvc" / "plots", repo / ".dvc" / "plots")
    definitions = [
        entry
        for entry in yaml.safe_load((PROJECT / "dvc.yaml").read_text())["plots"]
        if isinstance(entry, dict) and next(iter(entry)).startswith("plots/precision_recall_")
    ]
    assert len(definitions) == 2
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": definitions}))
    target = "plots/precision_recall_finetuned.json"
    classes = ["bird", "cat", "dog"]
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 3
    for name in ("head", "finetuned"):
        write_json(
            repo / f"plots/precision_recall_{name}.json",
            precision_recall_records(rng.dirichlet([1, 1, 1], 30), labels, classes),
        )
    records = json.loads((repo / target).read_text())
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "curves")

    spec = _vega_spec(repo, "show", target)
    values = spec["data"]["values"]
    assert [(v["class"], v["recall"], v["precision"]) for v in values] == [
        (r["class"], r["recall"], r["precision"]) for r in records
    ]
    assert {v["rev"] for v in values} == {"workspace"}
    encoding = spec["spec"]["encoding"]
    assert encoding["color"]["field"] == "class"  # one series per class
    assert (encoding["x"]["field"], encoding["y"]["field"]) == ("recall", "precision")
    assert encoding["order"] == {"value": None}  # drawn in the records' order, not sorted by x
    assert spec["facet"]["column"]["field"] == "rev"
    assert spec["title"]["text"].startswith("Test precision-recall per class, fine-tuned")

    # An experiment's curves beside the committed ones: one column per revision.
    write_json(repo / target, [{**r, "precision": 1.0} for r in records])
    diff = _vega_spec(repo, "diff", "HEAD", "--targets", target)
    assert sorted({v["rev"] for v in diff["data"]["values"]}) == ["HEAD", "workspace"]
    assert {v["class"] for v in diff["data"]["values"] if v["rev"] == "HEAD"} == set(classes)

    # The HTML page holds both charts with their data.
    run(repo, "dvc", "plots", "show", "-o", "page")
    page = (repo / "page" / "index.html").read_text(encoding="utf-8")
    assert page.count('"class": "dog"') >= 2 and "per class, head on cached features" in page
