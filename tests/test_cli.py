"""The `headstart` command end to end on a tiny real checkpoint: predict, info, export."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from headstart.backbones import build_backbone
from headstart.checkpoints import save_checkpoint
from headstart.cli import main
from headstart.export import EXPORT_FORMATS
from headstart.inference import FlipTTA, run_inference
from headstart.io import read_json
from headstart.loaders import ImageDataset
from headstart.model import Classifier, load_classifier
from headstart.transforms import eval_transform

CLASSES = ["bird", "cat", "dog"]
IMAGE_SIZE = 32
# Deliberately not the backbone's own normalisation: a CLI that re-specified preprocessing
# instead of reading it from the checkpoint would give different probabilities.
MEAN = [0.2, 0.4, 0.6]
STD = [0.3, 0.2, 0.1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A classifier checkpoint, metadata as finetune writes: the shipped (offline) pretrained
    backbone and a random head. A randomly initialised backbone gives the same features for
    every image, which would make every comparison below pass trivially."""
    torch.manual_seed(0)
    model = Classifier(build_backbone("efficientnet_lite0", "pretrained"), len(CLASSES))
    with torch.no_grad():
        model.head.weight.mul_(5.0)  # spread the probabilities so comparisons mean something
    path = tmp_path_factory.mktemp("model") / "finetuned.pt"
    save_checkpoint(
        path,
        model.state_dict(),
        {
            "kind": "classifier",
            "backbone": "efficientnet_lite0",
            "num_features": model.backbone.num_features,
            "image_size": IMAGE_SIZE,
            "mean": MEAN,
            "std": STD,
            "classes": CLASSES,
            "params": {"backbone": {"name": "efficientnet_lite0"}, "finetune": {"unfreeze": 1}},
            "summary": {"best_epoch": 1, "val_accuracy": 0.5},
        },
    )
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def reference_probabilities(
    checkpoint: Path, root: Path, paths: list[str], tta: bool = False
) -> np.ndarray:
    """(N, num_classes) softmax of run_inference logits through the checkpoint's transform;
    with `tta`, of the model wrapped in FlipTTA."""
    model, meta = load_classifier(checkpoint)
    model = FlipTTA(model) if tta else model
    transform = eval_transform(meta["image_size"], meta["mean"], meta["std"])
    loader = torch.utils.data.DataLoader(
        ImageDataset(root, paths, [0] * len(paths), transform, meta["image_size"]), batch_size=8
    )
    logits, _ = run_inference(model, loader, torch.device("cpu"))
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def test_predict_images_and_folder_json(checkpoint, image_folder, capsys):
    single = [image_folder / "cat" / "cat_00.png", image_folder / "dog" / "dog_01.jpg"]
    code, out, _ = run_cli(capsys, "predict", checkpoint, *single, "--format", "json", "--top-k", 3)
    assert code == 0
    results = json.loads(out)
    assert [r["path"] for r in results] == [str(p) for p in single]
    for result in results:
        assert result["error"] is None
        probabilities = [p["probability"] for p in result["predictions"]]
        assert sorted(p["class"] for p in result["predictions"]) == CLASSES
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert probabilities == sorted(probabilities, reverse=True)

    code, out, _ = run_cli(capsys, "predict", checkpoint, image_folder, "--format", "json")
    assert code == 0
    results = json.loads(out)
    expected = sorted(str(p) for p in image_folder.rglob("*") if p.is_file())
    assert [r["path"] for r in results] == expected  # one per image, recursive, sorted
    assert all(len(r["predictions"]) == 1 for r in results)  # default top-1
    assert all(0.0 < r["predictions"][0]["probability"] <= 1.0 for r in results)


def test_predictions_match_run_inference(checkpoint, image_folder, capsys):
    paths = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.*"))
    code, out, _ = run_cli(
        capsys, "predict", checkpoint, image_folder, "--format", "json", "--top-k", 10
    )
    assert code == 0
    got = np.array(
        [
            [{p["class"]: p["probability"] for p in r["predictions"]}[c] for c in CLASSES]
            for r in json.loads(out)
        ]
    )
    expected = reference_probabilities(checkpoint, image_folder, paths)
    # Not degenerate: probabilities differ between images and are far from uniform.
    assert expected.std(0).max() > 0.05 and expected.max() > 0.6
    # Same preprocessing and model; channels-last convolutions pick kernels by batch shape, so
    # the last float digits may differ between predict's batches and these (1e-6 seen).
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_predict_flip_tta_averages_the_image_and_its_mirror(checkpoint, image_folder, capsys):
    """--tta flip: softmax of the mean of the logits of each image and of its mirror, as the
    FlipTTA wrapper that evaluate uses gives; different from --tta none (the default)."""
    paths = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.*"))
    argv = ["predict", checkpoint, image_folder, "--format", "json", "--top-k", 3]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    plain = _probabilities_by_class(out)
    code, out, _ = run_cli(capsys, *argv, "--tta", "none")
    np.testing.assert_array_equal(_probabilities_by_class(out), plain)
    code, out, _ = run_cli(capsys, *argv, "--tta", "flip")
    assert code == 0
    flipped = _probabilities_by_class(out)
    assert np.abs(flipped - plain).max() > 0.01
    np.testing.assert_allclose(
        plain, reference_probabilities(checkpoint, image_folder, paths), atol=1e-5
    )
    expected = reference_probabilities(checkpoint, image_folder, paths, tta=True)
    np.testing.assert_allclose(flipped, expected, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_applies_no_tta_and_its_recipe_gives_predict_flip(
    checkpoint, image_folder, tmp_path, capsys
):
    """The export scores each image once (sidecar "tta": "none"); softmax of the mean of its
    log-probabilities for a batch and its mirror is `predict --tta flip`, as the docs say."""
    out = tmp_path / "model.ts.pt"
    code, _, _ = run_cli(capsys, "export", checkpoint, out, "--calibration", "none")
    assert code == 0
    assert read_json(out.with_suffix(".json"))["tta"] == "none"
    paths = ["cat/cat_00.png", "dog/dog_02.png", "bird/bird_05.jpg"]
    transform = eval_transform(IMAGE_SIZE, [0.0] * 3, [1.0] * 3)  # [0, 1] floats, unnormalised
    batch = torch.stack([transform(load_rgb(image_folder / p)) for p in paths])
    with torch.inference_mode():
        exported = torch.jit.load(str(out))
        once = exported(batch)
        both = torch.softmax((once.log() + exported(batch.flip(3)).log()) / 2, dim=1)
    expected = reference_probabilities(checkpoint, image_folder, paths)
    assert np.abs(once.numpy() - expected).max() < 1e-4
    flipped = reference_probabilities(checkpoint, image_folder, paths, tta=True)
    assert np.abs(flipped - expected).max() > 0.01
    assert np.abs(both.numpy() - flipped).max() < 1e-4


def test_csv_and_table_shapes(checkpoint, image_folder, capsys):
    image = image_folder / "bird" / "bird_02.png"
    code, out, _ = run_cli(capsys, "predict", checkpoint, image, "--format", "csv", "--top-k", 2)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == [
        "path",
        "rank",
        "class",
        "probability",
        "familiar",
        "distance",
        "error",
    ]
    assert {r["familiar"] for r in rows} == {""}  # no guard beside this checkpoint
    assert [(r["path"], r["rank"], r["error"]) for r in rows] == [
        (str(image), "1", ""),
        (str(image), "2", ""),
    ]
    assert float(rows[0]["probability"]) >= float(rows[1]["probability"])
    assert {r["class"] for r in rows} <= set(CLASSES)

    code, out, _ = run_cli(capsys, "predict", checkpoint, image, "--top-k", 2)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2 and lines[1].startswith(str(image))
    assert lines[1].count("(") == 2


def test_bad_files_are_reported_and_the_rest_predicted(checkpoint, image_folder, capsys, caplog):
    good = image_folder / "cat" / "cat_00.png"
    (image_folder / "cat" / "broken.png").write_bytes(good.read_bytes()[:120])
    (image_folder / "cat" / "notes.txt").write_text("not an image\n")
    (image_folder / "cat" / ".hidden.png").write_bytes(good.read_bytes())
    code, out, _ = run_cli(capsys, "predict", checkpoint, image_folder, "--format", "json")
    assert code == 1
    results = {Path(r["path"]).name: r for r in json.loads(out)}
    assert len(results) == 36 + 2  # hidden file skipped
    assert results["broken.png"]["error"]["reason"] == "truncated"
    assert results["notes.txt"]["error"]["reason"] == "not_image"
    assert results["broken.png"]["predictions"] == []
    others = [r for name, r in results.items() if name not in ("broken.png", "notes.txt")]
    assert len(others) == 36 and all(r["error"] is None and r["predictions"] for r in others)
    assert "broken.png: truncated" in caplog.text  # logged (stderr) as well as in the output

    code, out, _ = run_cli(capsys, "predict", checkpoint, image_folder, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    broken = [r for r in rows if r["path"].endswith("broken.png")]
    assert code == 1 and len(broken) == 1 and broken[0]["error"].startswith("truncated: ")
    assert broken[0]["class"] == ""

    missing = image_folder / "nope.png"
    code, out, _ = run_cli(capsys, "predict", checkpoint, good, missing, "--format", "json")
    assert code == 1
    assert [r["error"] and r["error"]["reason"] for r in json.loads(out)] == [None, "not_found"]


def test_usage_errors_exit_2(checkpoint, image_folder, tmp_path, capsys):
    missing = tmp_path / "no_such_model.pt"
    code, out, err = run_cli(capsys, "predict", missing, image_folder)
    assert code == 2 and out == ""
    assert str(missing) in err and len(err.strip().splitlines()) == 1

    not_a_checkpoint = tmp_path / "junk.pt"
    not_a_checkpoint.write_bytes(b"junk")
    code, _, err = run_cli(capsys, "info", not_a_checkpoint)
    assert code == 2 and str(not_a_checkpoint) in err

    code, _, _ = run_cli(capsys, "predict", checkpoint, image_folder, "--top-k", 0)
    assert code == 2
    code, _, _ = run_cli(capsys, "predict", checkpoint)  # no inputs: argparse's usage error
    assert code == 2
    code, out, err = run_cli(capsys, "predict", checkpoint, image_folder, "--tta", "foo")
    assert code == 2 and out == "" and "--tta" in err and "'foo'" in err


def test_device_this_machine_lacks_is_one_line_and_exit_2(checkpoint, image_folder):
    """`--device cuda` where no GPU is visible: the installed command prints one line naming
    the option and the fix, exits 2 (a usage error), and prints no traceback."""
    image = next(p for p in sorted(image_folder.rglob("*")) if p.is_file())
    script = Path(sys.executable).parent / "headstart"
    result = subprocess.run(
        [str(script), "predict", str(checkpoint), str(image), "--device", "cuda"],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # no GPU, even on a machine with one
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--device" in lines[0] and "CUDA is not available" in lines[0], lines[0]


def test_a_bug_keeps_its_traceback_and_exit_code_3(checkpoint, image_folder, monkeypatch, capsys):
    """Only HeadstartError is a user's problem: any other exception prints its traceback and
    exits 3, a code that neither a failed input (1) nor a usage error (2) gives."""
    import headstart.prediction

    def broken(*args, **kwargs):
        raise ValueError("a bug, not a bad input")

    monkeypatch.setattr(headstart.prediction, "predict_files", broken)
    code = main(["predict", str(checkpoint), str(image_folder)])
    err = capsys.readouterr().err
    assert code == 3
    assert "Traceback" in err and "ValueError: a bug, not a bad input" in err


def test_info_json(checkpoint, capsys):
    code, out, _ = run_cli(capsys, "info", checkpoint, "--format", "json")
    assert code == 0
    info = json.loads(out)
    assert info["classes"] == CLASSES and info["backbone"] == "efficientnet_lite0"
    assert info["image_size"] == IMAGE_SIZE and info["mean"] == MEAN and info["std"] == STD
    assert info["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    model, _ = load_classifier(checkpoint)
    assert info["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert info["summary"]["best_epoch"] == 1 and info["params"]["finetune"]["unfreeze"] == 1

    code, out, _ = run_cli(capsys, "info", checkpoint)
    assert code == 0 and "backbone: efficientnet_lite0" in out and "bird, cat, dog" in out


# Runs in a fresh interpreter: only torch, numpy, PIL and json; the sidecar drives the resize.
FRESH_PROCESS = r"""
import json, sys
import numpy as np
import torch
from PIL import Image

exported, sidecar, *images = sys.argv[1:]
spec = json.load(open(sidecar))
size = spec["image_size"]
batch = []
for path in images:
    image = Image.open(path).convert("RGB")
    width, height = image.size
    scale = size / min(width, height)  # short side to `size`, as torchvision's Resize
    new = (size, int(height * scale)) if width <= height else (int(width * scale), size)
    image = image.resize(new, Image.BICUBIC)
    left, top = round((new[0] - size) / 2.0), round((new[1] - size) / 2.0)
    image = image.crop((left, top, left + size, top + size))
    batch.append(np.asarray(image).transpose(2, 0, 1))  # (3, S, S) uint8
uint8 = torch.from_numpy(np.stack(batch))  # (B, 3, S, S)
model = torch.jit.load(exported)
with torch.inference_mode():
    from_uint8 = model(uint8)
    from_float = model(uint8.float() / 255.0)
assert "headstart" not in sys.modules, "the export must load without headstart"
print(json.dumps({"uint8": from_uint8.tolist(), "float": from_float.tolist()}))
"""


def test_export_torchscript_runs_without_headstart(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "export" / "model.ts.pt"
    code, _, _ = run_cli(capsys, "export", checkpoint, out, "--format", "torchscript")
    assert code == 0
    spec = read_json(out.with_suffix(".json"))
    assert spec["classes"] == CLASSES and spec["image_size"] == IMAGE_SIZE
    assert spec["mean"] == MEAN and spec["std"] == STD and spec["input"]["layout"] == "NCHW"
    assert spec["model_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()

    # Portrait, landscape and square; RGB and greyscale; PNG and JPEG.
    paths = ["cat/cat_01.jpg", "dog/dog_02.png", "bird/bird_04.png", "bird/bird_05.jpg"]
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(out), str(out.with_suffix(".json"))]
        + [str(image_folder / p) for p in paths],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    fresh = json.loads(result.stdout)
    expected = reference_probabilities(checkpoint, image_folder, paths)
    for key in ("uint8", "float"):
        assert np.abs(np.array(fresh[key]) - expected).max() < 1e-4, key


def test_console_script_help():
    script = Path(sys.executable).parent / "headstart"
    assert script.is_file(), "reinstall the package: pip install -e . (adds the headstart script)"
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert all(command in result.stdout for command in ("predict", "info", "export", "params"))


def _probabilities_by_class(out: str) -> np.ndarray:
    """(N, num_classes) from predict's JSON with --top-k covering every class."""
    return np.array(
        [
            [{p["class"]: p["probability"] for p in r["predictions"]}[c] for c in CLASSES]
            for r in json.loads(out)
        ]
    )


def test_predict_applies_the_calibration_beside_the_model(
    checkpoint, image_folder, tmp_path, capsys
):
    """The temperature evaluate fits changes the probabilities, never the predicted class."""
    import shutil

    from headstart.calibration import calibration_path, calibration_record
    from headstart.io import write_json

    model = shutil.copy(checkpoint, tmp_path / "finetuned.pt")
    paths = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.*"))
    argv = ["predict", model, image_folder, "--format", "json", "--top-k", 3]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    plain = _probabilities_by_class(out)
    assert not calibration_path(model).exists()

    temperature = 0.5
    write_json(calibration_path(model), calibration_record(model, temperature, True, {}))
    code, out, _ = run_cli(capsys, *argv)  # --calibration auto: the file beside the model
    assert code == 0
    calibrated = _probabilities_by_class(out)
    assert np.abs(calibrated - plain).max() > 0.05  # the probabilities moved ...
    assert (calibrated.argmax(1) == plain.argmax(1)).all()  # ... the predictions did not
    assert calibrated.max(1).mean() > plain.max(1).mean()  # T < 1 sharpens
    logits = np.log(reference_probabilities(model, image_folder, paths))  # up to a constant
    expected = torch.softmax(torch.from_numpy(logits) / temperature, dim=1).numpy()
    np.testing.assert_allclose(calibrated, expected, atol=1e-5)

    code, out, _ = run_cli(capsys, *argv, "--calibration", "none")
    assert code == 0
    np.testing.assert_allclose(_probabilities_by_class(out), plain, atol=1e-7)

    # A calibration file for another version of the model is refused, with the fix.
    other = tmp_path / "other.pt"
    other.write_bytes(b"another model")
    write_json(tmp_path / "stale.json", calibration_record(other, 2.0, True, {}))
    code, out, err = run_cli(capsys, *argv, "--calibration", tmp_path / "stale.json")
    assert code == 2 and out == "" and "another version" in err and "--calibration none" in err


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_builds_the_temperature_in(checkpoint, image_folder, tmp_path, capsys):
    import shutil

    from headstart.calibration import calibration_path, calibration_record
    from headstart.io import write_json

    model = shutil.copy(checkpoint, tmp_path / "finetuned.pt")
    write_json(calibration_path(model), calibration_record(model, 2.0, True, {}))
    out = tmp_path / "model.ts.pt"
    code, _, _ = run_cli(capsys, "export", model, out)
    assert code == 0
    assert read_json(out.with_suffix(".json"))["temperature"] == 2.0
    paths = ["cat/cat_00.png", "dog/dog_02.png"]
    logits = np.log(reference_probabilities(model, image_folder, paths))
    expected = torch.softmax(torch.from_numpy(logits) / 2.0, dim=1).numpy()
    transform = eval_transform(IMAGE_SIZE, [0.0] * 3, [1.0] * 3)  # [0, 1] floats, unnormalised
    batch = torch.stack([transform(load_rgb(image_folder / p)) for p in paths])
    with torch.inference_mode():
        got = torch.jit.load(str(out))(batch).numpy()
    assert np.abs(got - expected).max() < 1e-4


def load_rgb(path: Path):
    from headstart.images import decode_image

    return decode_image(path).image


@pytest.mark.parametrize("format_name", sorted(EXPORT_FORMATS))
def test_export_bytes_do_not_depend_on_where_the_code_lives(checkpoint, tmp_path, format_name):
    """Exports by two fresh processes running two copies of the package, in two folders, are
    byte-identical and name no file of this checkout or environment, so the export stage's DVC
    output has the same md5 in any clone. (The debug records TorchScript writes name source
    files by absolute path, and the ONNX exporter records each node's Python stack; both are
    stripped. Within one process a second TorchScript export differs: TorchScript numbers the
    classes it compiles, process-wide.)"""
    import shutil

    import headstart

    package = Path(headstart.__file__).parent
    out_name = "model" + EXPORT_FORMATS[format_name].suffix
    outs = []
    for name in ("a", "copy_b"):
        folder = tmp_path / name
        shutil.copytree(package, folder / "src" / "headstart")
        command = [sys.executable, "-m", "headstart.cli", "export", str(checkpoint), out_name]
        result = subprocess.run(
            command + ["--calibration", "none"],
            cwd=folder,
            env={**os.environ, "PYTHONPATH": str(folder / "src")},
            capture_output=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr.decode()
        outs.append((folder / out_name).read_bytes())
    assert outs[0] == outs[1]
    assert b".debug_pkl" not in outs[0] and b"stack_trace" not in outs[0]
    assert str(package).encode() not in outs[0] and str(tmp_path).encode() not in outs[0]
    assert str(Path(torch.__file__).parent).encode() not in outs[0]


def test_predict_reports_the_guard_beside_the_model(checkpoint, image_folder, tmp_path, capsys):
    """A guard file beside the model (as evaluate writes it): every image gets `familiar` and
    its distance in JSON and CSV; noise and a blank frame are flagged, the class images not;
    --guard none turns it off; a guard of another model version is refused."""
    import shutil

    from PIL import Image

    from headstart.familiarity import build_guard, guard_bytes, guard_path

    model_path = tmp_path / "finetuned.pt"
    shutil.copyfile(checkpoint, model_path)
    paths = sorted(str(p.relative_to(image_folder)) for p in image_folder.rglob("*.*"))
    model, meta = load_classifier(model_path)
    features, _ = run_inference(
        model.backbone,
        torch.utils.data.DataLoader(
            ImageDataset(
                image_folder, paths, [0] * len(paths), eval_transform(IMAGE_SIZE, MEAN, STD), 32
            ),
            batch_size=8,
        ),
        torch.device("cpu"),
    )
    guard = build_guard(features[::2], features[1::2], neighbours=3, flag_rate=0.05)
    guard_path(model_path).write_bytes(guard_bytes(guard, model_path))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(tmp_path / "n.png")
    Image.new("RGB", (48, 48), (0, 0, 0)).save(tmp_path / "blank.png")
    inputs = [tmp_path / "n.png", tmp_path / "blank.png", image_folder / "cat"]

    code, out, _ = run_cli(capsys, "predict", model_path, *inputs, "--format", "json")
    assert code == 0
    results = {Path(r["path"]).name: r for r in json.loads(out)}
    assert results["n.png"]["familiar"] is False and results["blank.png"]["familiar"] is False
    cats = [r for name, r in results.items() if name.startswith("cat")]
    assert len(cats) == 12 and sum(r["familiar"] for r in cats) >= 11
    assert all(r["distance"] > guard.threshold for r in (results["n.png"], results["blank.png"]))

    code, out, _ = run_cli(capsys, "predict", model_path, *inputs[:2], "--format", "csv")
    assert [r["familiar"] for r in csv.DictReader(io.StringIO(out))] == ["false", "false"]
    code, out, _ = run_cli(capsys, "predict", model_path, inputs[0])
    assert "UNFAMILIAR (distance" in out
    code, out, _ = run_cli(
        capsys, "predict", model_path, inputs[0], "--guard", "none", "--format", "json"
    )
    assert json.loads(out)[0]["familiar"] is None

    other = tmp_path / "other.pt"  # a checkpoint that loads, but is not the guard's model
    torch.save(torch.load(checkpoint, weights_only=False) | {"edited": True}, other)
    code, _, err = run_cli(capsys, "predict", other, inputs[0], "--guard", guard_path(model_path))
    assert code == 2 and "another version of" in err
