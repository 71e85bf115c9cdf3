"""Hostile and careless params, model files and output names: each is refused through the real
entry point (a stage's main under stage.run, or the `headstart` command) with its exit code,
one line naming the file or key, and no input or earlier output changed."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import classifier_meta, write_features
from test_stages import load_stage

from headstart.backbones import build_backbone
from headstart.calibration import calibration_path, calibration_record
from headstart.checkpoints import save_checkpoint
from headstart.cli import main
from headstart.io import write_json
from headstart.model import Classifier
from headstart.params import ParamsError, parse_params

CLASSES = ["bird", "cat", "dog"]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict:
    """A classifier checkpoint with its calibration file, and the pieces to make bad ones."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = Classifier(build_backbone("efficientnet_lite0", "none"), len(CLASSES)).eval()
    meta = classifier_meta(model, CLASSES)
    checkpoint = folder / "finetuned.pt"
    save_checkpoint(checkpoint, model.state_dict(), meta)
    write_json(calibration_path(checkpoint), calibration_record(checkpoint, 0.5, True, {}))
    image = folder / "image.png"
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(image)
    return {
        "folder": folder,
        "model": model,
        "meta": meta,
        "checkpoint": checkpoint,
        "image": image,
    }


def _small_features(folder: Path, scale: float = 1.0) -> Path:
    """Cached features of 8 values an image (clipped normals times `scale`), 24 train and 6
    val images of the three classes, as extract writes them."""
    rng = np.random.default_rng(0)
    splits = {
        split: (np.clip(rng.standard_normal((count, 8)), -3, 3) * scale, np.arange(count) % 3)
        for split, count in (("train", 24), ("val", 6))
    }
    return write_features(folder, splits, CLASSES)


def _train_head_fails(tmp_path, monkeypatch, params_dict, write_params, stage_run) -> list[str]:
    """Run train_head in tmp_path (features/ -> head.pt); assert it exits 1 with one error
    line, and return it."""
    write_params(tmp_path, params_dict)
    monkeypatch.chdir(tmp_path)
    code, errors = stage_run(load_stage("train_head").main, ["features", "head.pt", "live"])
    assert code == 1 and len(errors) == 1, errors
    return errors


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _bytes(*paths: Path) -> list[bytes]:
    return [p.read_bytes() for p in paths]


# --- Non-finite values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [("head.lr", float("inf")), ("finetune.lr_backbone", float("nan")), ("head.lr", 1.0e38)],
)
def test_a_non_finite_or_absurd_float_param_stops_the_stage_before_any_work(
    tmp_path, monkeypatch, params_dict, write_params, stage_run, key, value
):
    section, name = key.split(".")
    params_dict[section][name] = value
    errors = _train_head_fails(tmp_path, monkeypatch, params_dict, write_params, stage_run)
    assert key in errors[0]
    assert not (tmp_path / "head.pt").exists() and not (tmp_path / "live").exists()


def test_training_that_diverges_stops_naming_the_learning_rate(
    tmp_path, monkeypatch, params_dict, write_params, stage_run
):
    """Features so large that the logits overflow: the loss is not finite from the first step.
    train_head stops with the key to lower instead of saving NaN weights."""
    # Finite (float32 ends near 3.4e38), but their weighted sums overflow.
    _small_features(tmp_path / "features", scale=1e38)
    errors = _train_head_fails(tmp_path, monkeypatch, params_dict, write_params, stage_run)
    assert "diverged" in errors[0] and "head.lr" in errors[0]
    assert not (tmp_path / "head.pt").exists()


def test_a_model_returning_nan_is_not_exported(model_files, tmp_path, capsys):
    """Weights with a NaN pass every metadata check; the export's own check refuses them."""
    state = {k: v.clone() for k, v in model_files["model"].state_dict().items()}
    state["head.weight"][0, 0] = float("nan")
    broken = tmp_path / "nan.pt"
    save_checkpoint(broken, state, model_files["meta"])
    code, err = _cli(capsys, "export", broken, tmp_path / "nan.ts.pt", "--calibration", "none")
    assert code == 2
    assert "non-finite" in _one_line(err)
    assert not (tmp_path / "nan.ts.pt").exists() and not (tmp_path / "nan.ts.json").exists()


# --- Outputs over inputs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "out_name",
    [
        "finetuned.pt",  # the export over the checkpoint itself
        "finetuned.calibration.pt",  # its sidecar over the calibration file
        "head.pt",  # over another checkpoint headstart wrote
    ],
)
def test_export_never_writes_over_its_inputs_or_a_checkpoint(model_files, capsys, out_name):
    folder = model_files["folder"]
    other = folder / "head.pt"
    save_checkpoint(other, {"weight": torch.zeros(3, 4)}, {"kind": "head"})
    protected = [model_files["checkpoint"], calibration_path(model_files["checkpoint"]), other]
    before = _bytes(*protected)
    code, err = _cli(capsys, "export", model_files["checkpoint"], folder / out_name)
    assert code == 2
    line = _one_line(err)
    assert out_name.removesuffix(".pt") in line and "choose another output name" in line
    assert _bytes(*protected) == before


def test_the_export_stage_refuses_to_write_over_its_inputs(model_files, tmp_path, stage_run):
    checkpoint = model_files["checkpoint"]
    before = _bytes(checkpoint)
    code, errors = stage_run(
        load_stage("export").main,
        [str(checkpoint), str(calibration_path(checkpoint)), str(checkpoint)],
    )
    assert code == 1 and len(errors) == 1 and "would overwrite the input" in errors[0]
    assert _bytes(checkpoint) == before


def test_export_may_replace_an_earlier_export(model_files, tmp_path, capsys):
    out = tmp_path / "model.ts.pt"
    for _ in range(2):
        code, err = _cli(capsys, "export", model_files["checkpoint"], out, "--calibration", "none")
        assert code == 0, err


# --- Files read back are validated -------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"image_size": 20000}, "image_size"),
        ({"std": [0.0, 0.0, 0.0]}, "std"),
        ({"mean": [0.5, "x", 0.5]}, "mean"),
        ({"classes": "bird,cat,dog"}, "classes"),
        ({"backbone": "resnet9000"}, "backbone"),
        ({"kind": "head"}, "not a classifier checkpoint"),
        ({"classes": ["bird", "cat"]}, "do not fit the architecture"),  # 2 classes, 3 rows
    ],
)
def test_a_checkpoint_with_bad_metadata_is_refused_by_name(
    model_files, tmp_path, capsys, change, field
):
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, model_files["model"].state_dict(), model_files["meta"] | change)
    for command in (["predict", bad, model_files["image"]], ["info", bad]):
        code, err = _cli(capsys, *command)
        assert code == 2
        line = _one_line(err)
        assert str(bad) in line and field in line, line


def test_weights_of_another_architecture_are_refused(model_files, tmp_path, capsys):
    other = Classifier(build_backbone("mobilenet_v3_small", "none"), len(CLASSES))
    bad = tmp_path / "other.pt"
    save_checkpoint(bad, other.state_dict(), model_files["meta"])  # says efficientnet_lite0
    code, err = _cli(capsys, "predict", bad, model_files["image"])
    assert code == 2 and "do not fit the architecture" in _one_line(err)


@pytest.mark.parametrize(
    "content",
    [
        "not json {",
        json.dumps({"format": 1, "temperature": "hot", "model": {"sha256": "x"}}),
        json.dumps({"format": 1, "temperature": float("inf"), "model": {"sha256": "x"}}),
        json.dumps({"format": 1, "temperature": 0.5}),
        json.dumps([1, 2, 3]),
    ],
)
def test_a_broken_calibration_file_is_refused_by_name(model_files, tmp_path, capsys, content):
    calibration = tmp_path / "calibration.json"
    calibration.write_text(content, encoding="utf-8")
    code, err = _cli(
        capsys,
        "predict",
        model_files["checkpoint"],
        model_files["image"],
        "--calibration",
        calibration,
    )
    assert code == 2
    assert str(calibration) in _one_line(err)


def test_a_head_where_the_classifier_belongs_and_the_reverse(model_files, tmp_path, capsys):
    head = tmp_path / "head.pt"
    save_checkpoint(head, {"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}, {"kind": "head"})
    code, err = _cli(capsys, "predict", head, model_files["image"])
    assert code == 2 and "not a classifier checkpoint" in _one_line(err)

    from headstart.errors import ArtifactError
    from headstart.model import load_head

    with pytest.raises(ArtifactError, match="not a head checkpoint"):
        load_head(model_files["checkpoint"])


# --- Params that would break the stage commands or go unnoticed --------------------------------


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("data.dir", "data/Bob's photos", "quotes or control characters"),
        ("data.dir", "data/a\nb", "quotes or control characters"),
        ("data.dir", "-rf", "must not start with '-'"),
        ("compute.device", "cudaXYZ", "must be 'auto', 'cpu', 'cuda[:N]' or 'mps'"),
        ("backbone.weights", "/tmp/elsewhere.pth", "must be under pretrained/"),
        ("backbone.weights", "pretrained/../x.pth", "must be under pretrained/"),
    ],
)
def test_unsafe_or_untracked_values_are_refused(params_dict, key, value, expected):
    params = copy.deepcopy(params_dict)
    section, name = key.split(".")
    params[section][name] = value
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")) as raised:
        parse_params(params)
    assert expected in str(raised.value)


def test_a_weights_file_under_pretrained_is_accepted(params_dict):
    params_dict["backbone"]["weights"] = "pretrained/resnet50.pth"
    assert parse_params(params_dict).backbone.weights == "pretrained/resnet50.pth"


@pytest.mark.parametrize(("name", "kind"), [("model.ts.pt", "TorchScript"), ("model.onnx", "ONNX")])
def test_the_export_given_where_the_checkpoint_belongs_says_so(
    model_files, tmp_path, capsys, name, kind
):
    export = tmp_path / name
    assert (
        _cli(capsys, "export", model_files["checkpoint"], export, "--calibration", "none")[0] == 0
    )
    code, err = _cli(capsys, "predict", export, model_files["image"])
    assert code == 2
    line = _one_line(err)
    assert f"{kind} export" in line and "pass the checkpoint" in line


def test_a_killed_writes_temporary_files_are_ignored_by_git():
    """What atomic_dir leaves when killed (data/.features.<random>.tmp/) is not picked up by
    `git add -A`; the next write removes it."""
    import subprocess

    result = subprocess.run(
        ["git", "check-ignore", "-q", "data/.features.k3j9_x.tmp/train_features.npy"],
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    assert result.returncode == 0


# --- Stored artefacts verify themselves ------------------------------------------------------


def test_a_corrupt_features_file_is_named_with_how_to_restore_it(
    tmp_path, monkeypatch, params_dict, write_params, stage_run
):
    """DVC trusts its own cache: a byte flipped in a cached features file is checked out as it
    is. extract records each file's sha256 and train_head checks it before reading."""
    features = _small_features(tmp_path / "features")
    target = features / "train_features.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01  # one bit of the last feature value
    target.write_bytes(bytes(data))
    errors = _train_head_fails(tmp_path, monkeypatch, params_dict, write_params, stage_run)
    assert "train_features.npy: corrupt" in errors[0] and "dvc checkout --relink" in errors[0]
    assert not (tmp_path / "head.pt").exists()


def test_a_checkpoint_whose_content_changed_is_refused_with_how_to_restore_it(
    model_files, tmp_path, capsys
):
    """The checkpoint records the sha256 of its tensors and metadata; a tensor changed behind
    its back (here rewritten with torch.save, so the archive itself is well formed) is refused,
    and so is a byte flipped in the file."""
    data = torch.load(model_files["checkpoint"], weights_only=True)
    data["state_dict"]["head.bias"] = data["state_dict"]["head.bias"] + 1.0
    tampered = tmp_path / "tampered.pt"
    torch.save(data, tampered)
    code, err = _cli(capsys, "predict", tampered, model_files["image"])
    assert code == 2
    line = _one_line(err)
    assert f"{tampered}: corrupt" in line and "dvc checkout --relink" in line

    import zipfile

    flipped = tmp_path / "flipped.pt"
    raw = bytearray(model_files["checkpoint"].read_bytes())
    with zipfile.ZipFile(model_files["checkpoint"]) as archive:
        record = max(archive.infolist(), key=lambda r: r.file_size)  # the largest tensor
    raw[record.header_offset + 30 + len(record.filename) + len(record.extra) + 100] ^= 0x10
    flipped.write_bytes(bytes(raw))
    code, err = _cli(capsys, "predict", flipped, model_files["image"])
    assert code == 2 and str(flipped) in _one_line(err)


def test_backbone_weights_of_another_architecture_name_the_file_and_the_key(
    tmp_path, monkeypatch, image_folder, params_dict, write_params, stage_run
):
    """backbone.weights pointing at a state dict made for another network: extract stops with
    the file and backbone.name, not a size-mismatch traceback, and writes no features."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrained").mkdir()
    other = Classifier(build_backbone("mobilenet_v3_small", "none"), 3).backbone
    torch.save(other.state_dict(), tmp_path / "pretrained" / "other.pth")
    params_dict["data"]["dir"] = str(image_folder)
    params_dict["backbone"]["weights"] = "pretrained/other.pth"
    write_params(tmp_path, params_dict)
    assert stage_run(load_stage("prepare").main, [str(image_folder), "prepared", "m.json"])[0] == 0
    code, errors = stage_run(
        load_stage("extract").main, [str(image_folder), "prepared", "features"]
    )
    assert code == 1 and len(errors) == 1, errors
    assert "pretrained/other.pth" in errors[0] and "backbone.name efficientnet_lite0" in errors[0]
    assert not (tmp_path / "features").exists()


def test_a_full_disk_while_dvclive_writes_names_the_curves_folder(
    tmp_path, monkeypatch, params_dict, write_params, stage_run
):
    """DVCLive's own writes fail naming no file; the stage's one line names the curves' folder,
    and no head is saved."""
    import errno

    from dvclive.plots.metric import Metric

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no name

    monkeypatch.setattr(Metric, "dump", full_disk)
    _small_features(tmp_path / "features")
    errors = _train_head_fails(tmp_path, monkeypatch, params_dict, write_params, stage_run)
    assert errors[0].startswith("live: no space left on device writing the training curves")
    assert not (tmp_path / "head.pt").exists()
