"""timm backbones through the real `dvc repro`, `headstart predict` and `headstart export`.

A timm CNN and a timm ViT (timm's tiny test architectures, random init: `weights: none`) run
the main chain, the ViT through the export stage (the CNN stops at evaluate: its ONNX export
is tests/test_export_parity.py's); the ViT's fixed input size comes from its config
(`image_size: auto`). Then the backbone leaderboard: adding a timm candidate (a name with `:`,
as a matrix stage and a path) runs only that candidate's stages and the table; removing it
runs only the table.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_e2e_dvc import (
    FAST,
    _copy_repo,
    _env,
    _set_params,
    make_repo,
    ran_stages,
    run,
)

pytestmark = pytest.mark.e2e


def _headstart(repo, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "headstart.cli", *args]
    return subprocess.run(command, cwd=repo, env=_env(repo), capture_output=True, text=True)


@pytest.mark.parametrize(
    ("name", "image_size", "input_size", "last"),
    [
        ("timm:test_convnext.r160_in1k", 64, 64, "evaluate"),
        ("timm:test_vit.r160_in1k", "auto", 160, "export"),
    ],
)
def test_a_timm_backbone_runs_every_stage_predict_and_export(
    tmp_path, image_folder, name, image_size, input_size, last
):
    overrides = {**FAST, "backbone.name": name, "backbone.image_size": image_size}
    repo = make_repo(tmp_path, image_folder, overrides)
    # The main chain; the leaderboard with a timm name runs in the test below.
    output = run(repo, "dvc", "repro", last)
    chain = {"prepare", "extract", "audit", "train_head", "finetune", "evaluate"}
    assert ran_stages(output) == chain | {last}, output

    features = json.loads((repo / "data" / "features" / "meta.json").read_text())
    assert features["backbone"]["name"] == name
    assert features["image_size"] == input_size
    assert features["environment"]["packages"]["timm"]

    image = next(image_folder.rglob("*.png"))
    predicted = _headstart(repo, "predict", "models/finetuned.pt", str(image), "--format", "json")
    assert predicted.returncode == 0, predicted.stderr
    record = json.loads(predicted.stdout)[0]
    assert record["error"] is None
    assert record["predictions"][0]["class"] in ("bird", "cat", "dog")
    info = _headstart(repo, "info", "models/finetuned.pt")
    assert info.returncode == 0 and name in info.stdout, info.stdout + info.stderr
    exported = _headstart(
        repo, "export", "models/finetuned.pt", str(tmp_path / "model.ts"), "--format", "torchscript"
    )
    assert exported.returncode == 0, exported.stderr
    sidecar = json.loads((tmp_path / "model.json").read_text())
    assert sidecar["backbone"] == name and sidecar["image_size"] == input_size
    card = (repo / "reports" / "model_card.md").read_text()
    assert name in card


def test_adding_a_candidate_runs_only_it_and_removing_one_runs_only_the_table(
    dvc_baseline, tmp_path
):
    repo = _copy_repo(dvc_baseline, tmp_path / "repo")
    added = ["efficientnet_lite0", "timm:test_resnet.r160_in1k"]
    _set_params(repo, {"compare.backbones": added})
    output = run(repo, "dvc", "repro")
    assert ran_stages(output) == {
        "compare_extract@timm:test_resnet.r160_in1k",
        "compare_head@timm:test_resnet.r160_in1k",
        "compare",
    }, output
    board = json.loads((repo / "metrics" / "backbones.json").read_text())
    assert set(board["backbones"]) == set(added)
    for row in board["backbones"].values():
        assert 0.0 <= row["val_accuracy"] <= 1.0 and row["images_per_second"] > 0
        assert row["num_features"] > 0 and row["parameters"] > 0

    _set_params(repo, {"compare.backbones": ["efficientnet_lite0"]})
    output = run(repo, "dvc", "repro")
    assert ran_stages(output) == {"compare"}, output
    board = json.loads((repo / "metrics" / "backbones.json").read_text())
    assert list(board["backbones"]) == ["efficientnet_lite0"]
