"""Every stage's main(argv), in process, end to end on the synthetic ImageFolder.

The argv of each call mirrors the stage's `cmd` in dvc.yaml; settings come from a params.yaml
in the working directory, as under `dvc repro`.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import platform
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from headstart.model import load_classifier, load_head

PROJECT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")


def load_stage(name: str) -> ModuleType:
    path = PROJECT / "stages" / f"{name}.py"
    if str(path.parent) not in sys.path:  # as `python stages/<name>.py` has it: for _bootstrap
        sys.path.append(str(path.parent))
    spec = importlib.util.spec_from_file_location(f"headstart_stage_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _index_rows(prepared: Path) -> list[dict[str, str]]:
    with open(prepared / "index.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


# Each stage's argv, as its cmd in dvc.yaml passes it (data.dir is "images" here).
STAGE_ARGV = {
    "prepare": ["images", "data/prepared", "metrics/data.json"],
    "extract": ["images", "data/prepared", "data/features"],
    "train_head": ["data/features", "models/head.pt", "dvclive/train_head"],
    "finetune": [
        "images",
        "data/prepared",
        "models/head.pt",
        "models/finetuned.pt",
        "dvclive/finetune",
    ],
    "evaluate": [
        "images",
        "data/prepared",
        "data/features",
        "models/head.pt",
        "models/finetuned.pt",
        "metrics/evaluate.json",
        "metrics/per_class.json",
        "metrics/environment.json",
        "plots",
        "models/finetuned.calibration.json",
        "reports/model_card.md",
        "models/finetuned.guard.safetensors",
    ],
    "export": [
        "models/finetuned.pt",
        "models/finetuned.calibration.json",
        "models/finetuned.onnx",
    ],
}


def run_stages(work: Path, names: list[str]) -> None:
    """Run the named stages' main(argv) in order, in `work`, as `dvc repro` would."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        for name in names:
            load_stage(name).main(STAGE_ARGV[name])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, image_folder_factory, params_factory, write_params) -> Path:
    """Run prepare -> extract -> train_head -> finetune -> evaluate -> export once in a fresh
    folder."""
    work = tmp_path_factory.mktemp("pipeline")
    image_folder_factory(work / "images")
    write_params(work, params_factory())
    run_stages(work, list(STAGE_ARGV))
    return work


EXPECTED_OUTPUTS = [
    "data/prepared/index.csv",
    "data/prepared/classes.json",
    "data/prepared/report.json",
    "metrics/data.json",
    *(f"data/features/{s}_{part}.npy" for s in SPLITS for part in ("features", "labels")),
    "data/features/meta.json",
    "models/head.pt",
    "dvclive/train_head/metrics.json",
    "models/finetuned.pt",
    "dvclive/finetune/metrics.json",
    "metrics/evaluate.json",
    "metrics/per_class.json",
    "metrics/environment.json",
    "plots/confusion_head.json",
    "plots/confusion_finetuned.json",
    *(f"plots/reliability_{m}.json" for m in ("head", "finetuned", "calibrated")),
    "plots/per_class_f1.json",
    *(f"plots/precision_recall_{m}.json" for m in ("head", "finetuned")),
    "plots/confusion_finetuned.png",
    "plots/worst_misclassified.png",
    "models/finetuned.calibration.json",
    "reports/model_card.md",
    "models/finetuned.guard.safetensors",
    "models/finetuned.onnx",
    "models/finetuned.onnx.json",
]


def test_every_output_exists(pipeline):
    missing = [name for name in EXPECTED_OUTPUTS if not (pipeline / name).is_file()]
    assert missing == []
    leftovers = [p for p in pipeline.rglob("*.tmp")]
    assert leftovers == []


def test_prepare_outputs(pipeline):
    rows = _index_rows(pipeline / "data/prepared")
    assert len(rows) == 36
    assert _read_json(pipeline / "data/prepared/classes.json") == ["bird", "cat", "dog"]
    metrics = _read_json(pipeline / "metrics/data.json")
    counts = Counter(r["split"] for r in rows)
    assert metrics == {
        "images": 36,
        "classes": 3,
        **{s: counts[s] for s in SPLITS},
        "skipped": 0,
        "imbalance_ratio": 1.0,
        "near_copy_groups": 0,
    }


def test_extract_outputs(pipeline):
    features = pipeline / "data/features"
    rows = _index_rows(pipeline / "data/prepared")
    meta = _read_json(features / "meta.json")
    assert meta["image_size"] == 32
    assert meta["classes"] == ["bird", "cat", "dog"]
    assert meta["backbone"]["name"] == "efficientnet_lite0"
    for split in SPLITS:
        x = np.load(features / f"{split}_features.npy")
        y = np.load(features / f"{split}_labels.npy")
        split_rows = [r for r in rows if r["split"] == split]
        assert x.shape == (len(split_rows), meta["num_features"])
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert np.isfinite(x).all()
        assert y.tolist() == [meta["classes"].index(r["label"]) for r in split_rows]


def test_extract_writes_each_split_from_one_pass(tmp_path):
    """extract runs over all the images in split order (Images.in_split_order) and cuts the
    batches at the split boundaries: every row lands in its split's files, in order, whether a
    batch spans two splits, all three, or a split is empty."""
    from headstart.index import Images

    splits = np.array([2, 0, 1, 0, 2, 0, 0, 2, 1, 0, 2], dtype=np.int8)
    images = Images(
        [f"c/{i}.png" for i in range(len(splits))],
        np.arange(len(splits), dtype=np.int64),
        splits,
        np.zeros(len(splits), dtype="S64"),
    )
    ordered, parts = images.in_split_order()
    assert parts == [slice(0, 5), slice(5, 7), slice(7, 11)]
    assert ordered.paths == [f"c/{i}.png" for i in (1, 3, 5, 6, 9, 2, 8, 0, 4, 7, 10)]
    assert ordered.splits.tolist() == [0] * 5 + [1] * 2 + [2] * 4

    from headstart.extraction import write_by_split

    for counts, sizes in (([5, 2, 4], [3, 3, 3, 2]), ([1, 0, 3], [4]), ([0, 2, 0], [1, 1])):
        out = tmp_path / f"{counts}-{sizes}"
        out.mkdir()
        rows = np.arange(sum(counts))
        batches, first = [], 0
        for size in sizes:  # features: the row number in each of 3 columns; labels: -row
            part = rows[first : first + size]
            batches.append((np.repeat(part[:, None], 3, axis=1).astype(np.float32), -part))
            first += size
        ends = np.cumsum(counts).tolist()
        parts = [slice(a, b) for a, b in zip([0, *ends], ends, strict=False)]
        write_by_split(iter(batches), out, parts, width=3)
        for split, part in zip(SPLITS, parts, strict=True):
            low, high = part.start, part.stop
            features = np.load(out / f"{split}_features.npy")
            labels = np.load(out / f"{split}_labels.npy")
            assert features.shape == (high - low, 3) and features.dtype == np.float32
            assert features[:, 0].tolist() == list(range(low, high)), (counts, sizes, split)
            assert labels.tolist() == [-r for r in range(low, high)], (counts, sizes, split)


def test_model_outputs_load(pipeline):
    head, head_meta = load_head(pipeline / "models/head.pt")
    assert head_meta["classes"] == ["bird", "cat", "dog"]
    assert head.in_features == head_meta["in_features"] == 1280
    assert head_meta["params"]["epochs"] == 3
    model, meta = load_classifier(pipeline / "models/finetuned.pt")
    assert meta["backbone"] == "efficientnet_lite0"
    assert meta["image_size"] == 32
    assert meta["params"]["finetune"]["unfreeze"] == 1
    with torch.inference_mode():
        logits = model(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 3)
    # 0: no epoch beat the linear probe it started as, which is then what was saved.
    assert meta["summary"]["best_epoch"] in (0, 1)
    assert 0.0 <= meta["summary"]["probe_val_accuracy"] <= meta["summary"]["val_accuracy"]
    if meta["summary"]["best_epoch"] == 0:
        assert torch.equal(model.head.weight, head.weight)
    assert 1 <= head_meta["summary"]["best_epoch"] <= 3


def test_training_curves_logged(pipeline):
    head_summary = _read_json(pipeline / "dvclive/train_head/metrics.json")
    assert "best_epoch" in head_summary, sorted(head_summary)
    assert 1 <= head_summary["best_epoch"] <= 3
    assert 0.0 <= head_summary["best_val_accuracy"] <= 1.0
    finetune_summary = _read_json(pipeline / "dvclive/finetune/metrics.json")
    assert finetune_summary["best_epoch"] in (0, 1)  # 0: the probe it started as was kept
    assert finetune_summary["probe_val_accuracy"] <= finetune_summary["best_val_accuracy"]
    assert finetune_summary["step"] == 0  # one epoch logged: the probe is not a curve point


def test_evaluate_outputs(pipeline):
    rows = _index_rows(pipeline / "data/prepared")
    test_labels = Counter(r["label"] for r in rows if r["split"] == "test")
    num_test = sum(test_labels.values())
    assert num_test >= 3

    metrics = _read_json(pipeline / "metrics/evaluate.json")
    assert metrics["test_images"] == num_test
    for model in ("head", "finetuned"):
        assert 0.0 <= metrics[model]["accuracy"] <= 1.0
        assert 0.0 <= metrics[model]["macro_f1"] <= 1.0

    per_class = _read_json(pipeline / "metrics/per_class.json")
    for model in ("head", "finetuned"):
        assert sorted(per_class[model]) == ["bird", "cat", "dog"]
        for label, scores in per_class[model].items():
            assert scores["support"] == test_labels[label]

    for model in ("head", "finetuned"):
        records = _read_json(pipeline / f"plots/confusion_{model}.json")
        assert len(records) == num_test
        assert Counter(r["actual"] for r in records) == test_labels
        assert {r["predicted"] for r in records} <= {"bird", "cat", "dog"}
        correct = sum(r["actual"] == r["predicted"] for r in records)
        assert metrics[model]["accuracy"] == pytest.approx(correct / num_test, abs=1e-6)


def test_environment_is_recorded_for_every_computing_stage(pipeline):
    """Which software and machine produced the features, the models and the metrics."""
    environment = _read_json(pipeline / "metrics/environment.json")
    assert sorted(environment) == ["evaluate", "extract", "finetune", "train_head"]
    for stage, record in environment.items():
        assert record["packages"]["torch"] == importlib.metadata.version("torch"), stage
        assert record["python"] == platform.python_version(), stage
        assert record["device"] == "cpu", stage
        assert record["torch_threads"] >= 1, stage
        assert record["cpu"], stage
    # The same record travels inside the features' meta and each checkpoint.
    assert _read_json(pipeline / "data/features/meta.json")["environment"] == environment["extract"]
    _, finetune_meta = load_classifier(pipeline / "models/finetuned.pt")
    assert finetune_meta["environment"] == environment["finetune"]


def test_train_head_logreg(pipeline, tmp_path, monkeypatch, params_dict, write_params):
    monkeypatch.chdir(tmp_path)
    params_dict["head"]["kind"] = "logreg"
    write_params(tmp_path, params_dict)
    features = pipeline / "data/features"
    load_stage("train_head").main([str(features), "head.pt", "live"])
    head, meta = load_head(tmp_path / "head.pt")
    assert meta["params"]["kind"] == "logreg"
    assert meta["summary"]["C"] in (0.001, 0.01, 0.1, 1.0, 10.0)
    val_x = torch.from_numpy(np.load(features / "val_features.npy"))
    val_y = np.load(features / "val_labels.npy")
    with torch.inference_mode():
        accuracy = float((head(val_x).argmax(1).numpy() == val_y).mean())
    assert accuracy == pytest.approx(meta["summary"]["best_val_accuracy"])
    summary = _read_json(tmp_path / "live/metrics.json")
    assert summary["best_val_accuracy"] == meta["summary"]["best_val_accuracy"]


def _save_random_lite0(path: Path) -> Path:
    """A local weights file, so extraction does not depend on the random number generator."""
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    torch.save(net.state_dict(), path)
    return path


def test_extract_is_byte_identical_across_runs(
    tmp_path, monkeypatch, image_folder, params_dict, write_params
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HEADSTART_CACHE", "off")  # both runs compute every image
    (tmp_path / "pretrained").mkdir()
    _save_random_lite0(tmp_path / "pretrained" / "lite0.pth")
    params_dict["backbone"]["weights"] = "pretrained/lite0.pth"
    write_params(tmp_path, params_dict)
    load_stage("prepare").main(["images", "prepared", "data.json"])
    extract = load_stage("extract")

    torch.manual_seed(1)
    extract.main(["images", "prepared", "first"])
    # Different random state and worker processes: neither may change a byte.
    torch.manual_seed(2)
    params_dict["compute"]["num_workers"] = 2
    write_params(tmp_path, params_dict)
    extract.main(["images", "prepared", "second"])

    first = sorted(p.name for p in (tmp_path / "first").iterdir())
    assert first == sorted(p.name for p in (tmp_path / "second").iterdir())
    assert "train_features.npy" in first
    for name in first:
        assert (tmp_path / "first" / name).read_bytes() == (
            tmp_path / "second" / name
        ).read_bytes(), name


def test_class_list_changed_after_extract_is_refused(pipeline, tmp_path, monkeypatch, make_image):
    """A new class folder after features and head were made must not be
    trained or scored with the stale head: finetune and evaluate stop naming the mismatch."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(pipeline, work)
    for index in range(6):
        make_image(work / "images" / "zebra" / f"{index}.png", "dog", seed=500 + index)
    monkeypatch.chdir(work)
    load_stage("prepare").main(["images", "data/prepared", "metrics/data.json"])
    with pytest.raises(ValueError, match=r"models/head.pt: trained for classes .*zebra"):
        load_stage("finetune").main(
            ["images", "data/prepared", "models/head.pt", "models/new.pt", "dvclive/finetune"]
        )
    assert not (work / "models" / "new.pt").exists()
    with pytest.raises(ValueError, match="trained for classes"):
        load_stage("evaluate").main(STAGE_ARGV["evaluate"])


def test_evaluate_writes_the_guard_and_measures_it(pipeline):
    """The guard file beside the model, tied to it, read back as predict reads it; its val
    share as asked; the test and foreign shares in the metrics and the model card."""
    from headstart.familiarity import read_guard

    metrics = _read_json(pipeline / "metrics/evaluate.json")
    guard = metrics["guard"]
    assert sorted(guard) == [
        "foreign_caught",
        "neighbours",
        "test_flagged",
        "threshold",
        "val_flagged",
    ]
    assert sorted(guard["foreign_caught"]) == ["blank", "noise"]  # the test params' sets
    assert all(0.0 <= share <= 1.0 for share in guard["foreign_caught"].values())
    assert guard["val_flagged"] <= 0.05  # the test params' guard_flag_rate
    loaded = read_guard(
        pipeline / "models/finetuned.guard.safetensors", pipeline / "models/finetuned.pt"
    )
    assert loaded.threshold == pytest.approx(guard["threshold"], abs=1e-6)
    assert loaded.neighbours == guard["neighbours"] == 3
    card = (pipeline / "reports/model_card.md").read_text(encoding="utf-8")
    assert "| unfamiliar images | flagged when the mean distance to the 3 nearest" in card


def test_evaluate_calibration_and_pictures(pipeline):
    """ECE, the calibration file predict reads, the reliability and F1 plot data, the PNGs."""
    from PIL import Image

    from headstart.calibration import read_temperature

    metrics = _read_json(pipeline / "metrics/evaluate.json")
    num_test = metrics["test_images"]
    for model in ("head", "finetuned"):
        assert 0.0 <= metrics[model]["ece"] <= 1.0
    assert 0.0 <= metrics["finetuned"]["ece_calibrated"] <= 1.0
    calibration = _read_json(pipeline / "models/finetuned.calibration.json")
    assert calibration["fitted"] is True and calibration["val_images"] >= 3
    assert calibration["temperature"] == metrics["finetuned"]["temperature"] > 0
    # It belongs to the model finetune wrote (and predict will check that).
    temperature = read_temperature(
        pipeline / "models/finetuned.calibration.json", pipeline / "models/finetuned.pt"
    )
    assert temperature == calibration["temperature"]

    for name in ("head", "finetuned", "calibrated"):
        bins = _read_json(pipeline / f"plots/reliability_{name}.json")
        assert sum(b["count"] for b in bins) == num_test
        assert all(0.0 <= b["accuracy"] <= 1.0 and 0.0 < b["confidence"] <= 1.0 for b in bins)
    per_class = _read_json(pipeline / "metrics/per_class.json")
    f1 = _read_json(pipeline / "plots/per_class_f1.json")
    assert [r["class"] for r in f1] == ["bird", "cat", "dog"]
    assert all(r["finetuned"] == per_class["finetuned"][r["class"]]["f1"] for r in f1)

    for name in ("confusion_finetuned", "worst_misclassified"):
        with Image.open(pipeline / f"plots/{name}.png") as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
            assert not image.info.get("dpi") and "Software" not in image.info


def test_evaluate_precision_recall_curves_and_average_precision(pipeline):
    """One curve per class with test images, from (recall 0, precision 1) to recall 1 at the
    class's share of the test images (every image predicted positive), recall never falling."""
    per_class = _read_json(pipeline / "metrics/per_class.json")
    metrics = _read_json(pipeline / "metrics/evaluate.json")
    for model in ("head", "finetuned"):
        records = _read_json(pipeline / f"plots/precision_recall_{model}.json")
        assert all(sorted(r) == ["class", "precision", "recall"] for r in records)
        curves = {}
        for r in records:
            curves.setdefault(r["class"], []).append((r["recall"], r["precision"]))
        assert list(curves) == ["bird", "cat", "dog"]
        for label, curve in curves.items():
            support = per_class[model][label]["support"]
            assert curve[0] == (0.0, 1.0) and curve[-1][0] == 1.0
            assert curve[-1][1] == pytest.approx(support / metrics["test_images"], abs=1e-4)
            assert all(a[0] <= b[0] and a != b for a, b in itertools.pairwise(curve))
            assert 0.0 < per_class[model][label]["average_precision"] <= 1.0


def test_evaluate_with_flip_tta(pipeline, tmp_path, params_dict, write_params):
    """evaluate.tta: flip scores the fine-tuned model, on val (the temperature) and test, by
    the mean of the logits of each image and its mirror, computed here by hand; the head on
    cached features is scored as without TTA; each output says which it was. The model: the
    shipped pretrained backbone and a random head (the pipeline's random-init backbone gives
    every image the same logits, mirrored or not)."""
    import shutil

    from conftest import classifier_meta

    from headstart.backbones import build_backbone
    from headstart.calibration import calibrate, expected_calibration_error, softmax
    from headstart.checkpoints import save_checkpoint
    from headstart.index import load_prepared
    from headstart.inference import run_inference
    from headstart.loaders import image_loader
    from headstart.model import Classifier
    from headstart.transforms import decode_size, eval_transform, preprocessing

    work = shutil.copytree(pipeline, tmp_path / "work")
    torch.manual_seed(0)
    model = Classifier(build_backbone("efficientnet_lite0", "pretrained"), 3)
    with torch.no_grad():
        model.head.weight.mul_(5.0)  # spread the probabilities
    classes = ["bird", "cat", "dog"]
    save_checkpoint(
        work / "models/finetuned.pt", model.state_dict(), classifier_meta(model, classes)
    )
    run_stages(work, ["evaluate"])
    plain = _read_json(work / "metrics/evaluate.json")
    params_dict["evaluate"]["tta"] = "flip"
    write_params(work, params_dict)
    run_stages(work, ["evaluate"])
    metrics = _read_json(work / "metrics/evaluate.json")
    assert plain["finetuned"]["tta"] == "none" and metrics["finetuned"]["tta"] == "flip"
    assert metrics["head"] == plain["head"]

    model, meta = load_classifier(work / "models/finetuned.pt")
    assert _read_json(pipeline / "metrics/evaluate.json")["finetuned"]["tta"] == "none"
    prepared = load_prepared(work / "images", work / "data/prepared")

    def mean_logits(split: str) -> tuple[np.ndarray, np.ndarray]:
        loader = image_loader(
            prepared.root,
            prepared.split(split),
            eval_transform(**preprocessing(meta)),
            decode_size=decode_size(meta),
            batch_size=16,
            num_workers=0,
        )
        mirrored = [(images.flip(3), labels) for images, labels in loader]
        logits, labels = run_inference(model, loader, torch.device("cpu"))
        mirror, _ = run_inference(model, mirrored, torch.device("cpu"))
        assert np.abs(mirror - logits).max() > 1e-4  # the model tells a mirror apart
        return (logits + mirror) / 2, labels

    test_logits, test_labels = mean_logits("test")
    ece = expected_calibration_error(softmax(test_logits), test_labels)
    assert metrics["finetuned"]["ece"] == pytest.approx(ece, abs=2e-6)
    assert metrics["finetuned"]["ece"] != plain["finetuned"]["ece"]
    accuracy = float((test_logits.argmax(1) == test_labels).mean())
    assert metrics["finetuned"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    temperature, _ = calibrate(*mean_logits("val"))
    assert metrics["finetuned"]["temperature"] == pytest.approx(temperature, rel=1e-4)

    calibration = _read_json(work / "models/finetuned.calibration.json")
    assert calibration["tta"] == "flip" and calibration["test"]["tta"] == "flip"
    card = (work / "reports/model_card.md").read_text(encoding="utf-8")
    assert "| test-time augmentation | flip: the mean of the logits" in card


def test_model_card_describes_the_run(pipeline):
    card = (pipeline / "reports/model_card.md").read_text(encoding="utf-8")
    metrics = _read_json(pipeline / "metrics/evaluate.json")
    report = _read_json(pipeline / "data/prepared/report.json")
    assert card.startswith("# Model card: efficientnet_lite0 fine-tuned on 3 classes\n")
    for label, counts in report["counts"].items():
        row = f"| {label} | {counts['train']} | {counts['val']} | {counts['test']} |"
        assert row in card
    assert f"| fine-tuned | {metrics['finetuned']['accuracy']:.4f} |" in card
    assert "| `finetune.unfreeze` | `1` |" in card and "| `head.epochs` | `3` |" in card
    assert "| `backbone.weights` | `none` |" in card
    _, meta = load_classifier(pipeline / "models/finetuned.pt")
    assert f"| torch | {meta['environment']['packages']['torch']} |" in card
    assert "## Most confused classes" in card and "## Calibration" in card


def test_evaluate_rerun_is_byte_identical(pipeline, tmp_path):
    """Same inputs, same outputs, byte for byte: the card, the JSON and the PNGs alike."""
    import shutil

    work = shutil.copytree(pipeline, tmp_path / "work")
    first, last = (
        EXPECTED_OUTPUTS.index("metrics/evaluate.json"),
        EXPECTED_OUTPUTS.index("reports/model_card.md"),
    )
    outputs = EXPECTED_OUTPUTS[first : last + 1]
    assert "plots/worst_misclassified.png" in outputs
    before = {name: (work / name).read_bytes() for name in outputs}
    for name in outputs:
        (work / name).unlink()
    run_stages(work, ["evaluate"])
    changed = [name for name in outputs if (work / name).read_bytes() != before[name]]
    assert changed == []


def test_export_stage_applies_the_calibration(pipeline):
    """The exported probabilities are the fine-tuned model's, at the fitted temperature."""
    import onnxruntime

    from headstart.images import decode_image
    from headstart.transforms import eval_transform, split_normalization

    calibration = _read_json(pipeline / "models/finetuned.calibration.json")
    sidecar = _read_json(pipeline / "models/finetuned.onnx.json")
    assert sidecar["temperature"] == calibration["temperature"]
    assert sidecar["tta"] == "none"  # never built in, whatever evaluate.tta
    assert sidecar["classes"] == ["bird", "cat", "dog"] and sidecar["image_size"] == 32
    rows = [r for r in _index_rows(pipeline / "data/prepared") if r["split"] == "test"]
    images = [decode_image(pipeline / "images" / r["path"]).image for r in rows]
    model, meta = load_classifier(pipeline / "models/finetuned.pt")
    normalised = eval_transform(32, meta["mean"], meta["std"])
    pixels, _ = split_normalization(normalised)  # uint8: the export normalises inside
    with torch.inference_mode():
        logits = model(torch.stack([normalised(i) for i in images]))
        expected = torch.softmax(logits / calibration["temperature"], dim=1).numpy()
    session = onnxruntime.InferenceSession(
        str(pipeline / "models/finetuned.onnx"), providers=["CPUExecutionProvider"]
    )
    batch = torch.stack([pixels(i) for i in images]).numpy()
    (got,) = session.run(None, {sidecar["input"]["name"]: batch})
    assert np.abs(got - expected).max() < 1e-4


def test_info_shows_the_evaluation_beside_the_model(pipeline, capsys):
    """`headstart info` on the pipeline's model: test metrics, data fingerprint, temperature
    and environment, from the checkpoint and the calibration file evaluate wrote."""
    from headstart.cli import main

    assert main(["info", str(pipeline / "models/finetuned.pt"), "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    metrics = _read_json(pipeline / "metrics/evaluate.json")
    evaluation = info["calibration"]
    assert evaluation["temperature"] == metrics["finetuned"]["temperature"]
    assert evaluation["test"]["accuracy"] == metrics["finetuned"]["accuracy"]
    assert evaluation["test"]["images"] == metrics["test_images"]
    assert evaluation["tta"] == "none"  # what the temperature was fitted with
    # The recorded formula: sha256 over the index's sorted "sha256,label,split" lines.
    rows = _index_rows(pipeline / "data/prepared")
    lines = sorted(f"{r['sha256']},{r['label']},{r['split']}" for r in rows)
    assert evaluation["data_fingerprint"] == hashlib.sha256("\n".join(lines).encode()).hexdigest()
    assert info["environment"]["device"] == "cpu"


def test_evaluate_without_calibration(pipeline, tmp_path, params_dict, write_params):
    """evaluate.calibrate: false: temperature 1.0 everywhere, so predict changes nothing."""
    import shutil

    work = shutil.copytree(pipeline, tmp_path / "work")
    params_dict["evaluate"]["calibrate"] = False
    write_params(work, params_dict)
    run_stages(work, ["evaluate"])
    metrics = _read_json(work / "metrics/evaluate.json")
    assert metrics["finetuned"]["temperature"] == 1.0
    assert metrics["finetuned"]["ece_calibrated"] == metrics["finetuned"]["ece"]
    calibration = _read_json(work / "models/finetuned.calibration.json")
    assert calibration["fitted"] is False and calibration["temperature"] == 1.0
    assert "val_images" not in calibration  # no validation pass was made
    card = (work / "reports/model_card.md").read_text(encoding="utf-8")
    assert "No temperature fitted (`evaluate.calibrate: false`)" in card


@pytest.mark.parametrize(
    ("augment", "mixup", "chosen"),
    [
        ("none", 0.0, "caching the activations below the top 1 blocks once"),
        ("light", 0.0, "augment light, unfreeze 1 of 8 blocks: every epoch runs the whole"),
        ("none", 0.2, "augment none with MixUp/CutMix, unfreeze 1 of 8 blocks: every epoch"),
    ],
)
def test_finetune_picks_cached_activations_without_augmentation(
    pipeline, tmp_path, monkeypatch, params_dict, write_params, caplog, augment, mixup, chosen
):
    """augment none: the stage picks the cached-activation path itself, says so, and leaves
    nothing but the model behind; with augmentation (MixUp too: it mixes images, not the
    activations at the cut), the whole backbone runs every epoch."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(pipeline, work)
    params_dict["finetune"]["augment"] = augment
    params_dict["finetune"]["mixup"] = mixup
    write_params(work, params_dict)
    monkeypatch.chdir(work)
    if chosen.startswith("caching"):  # what a killed run leaves: removed by the next one
        (work / "models" / ".finetune-activations-killed").mkdir()
        (work / "models" / ".finetune-activations-killed" / "train.npy").write_bytes(b"x")
    with caplog.at_level("INFO", logger="headstart"):
        load_stage("finetune").main(STAGE_ARGV["finetune"])
    assert chosen in caplog.text
    # Nothing but what the pipeline had (models, calibration, export): no activation folder.
    names = sorted(p.name for p in (work / "models").iterdir())
    assert names == sorted(p.name for p in (pipeline / "models").iterdir())
    _, meta = load_classifier(work / "models/finetuned.pt")
    assert meta["params"]["finetune"]["augment"] == augment
    load_stage("evaluate").main(STAGE_ARGV["evaluate"])
    metrics = _read_json(work / "metrics/evaluate.json")
    assert 0.0 <= metrics["finetuned"]["accuracy"] <= 1.0


def test_finetune_function_runs_either_path_to_the_same_model(pipeline, params_dict):
    """headstart.finetuning.finetune, which the stage and bench/finetune_cached.py call: with
    augment none, forcing the whole backbone every epoch (cache=False) trains the same model as
    the cached activations (cache=True), within float rounding; every epoch is timed; and
    caching is refused where it would drop the augmentation."""
    import dataclasses

    from headstart.checkpoints import load_checkpoint
    from headstart.finetuning import finetune
    from headstart.index import load_prepared
    from headstart.params import parse_params

    params = parse_params(params_dict)
    ft = dataclasses.replace(params.finetune, augment="none", epochs=2, patience=2)
    prepared = load_prepared(pipeline / "images", pipeline / "data/prepared")
    head_state, head_meta = load_checkpoint(pipeline / "models/head.pt")
    results = {
        cache: finetune(
            prepared,
            head_state,
            head_meta,
            params.backbone,
            params.compute,
            ft,
            scratch_dir=pipeline / "models",
            cache=cache,
        )
        for cache in (False, True)
    }
    whole, cached = results[False].model.state_dict(), results[True].model.state_dict()
    # Both trained the same, epoch by epoch, whichever epoch (the probe's 0 included) was kept.
    assert results[False].fit.best_epoch == results[True].fit.best_epoch
    for a, b in zip(results[False].fit.history, results[True].fit.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    for key, value in whole.items():
        torch.testing.assert_close(cached[key], value, atol=1e-4, rtol=1e-4, msg=key)
    for result in results.values():
        assert len(result.fit.epoch_seconds) == len(result.fit.history) == 2
        assert all(seconds > 0 for seconds in result.fit.epoch_seconds)
    with pytest.raises(ValueError, match="cannot be augmented"):
        finetune(
            prepared,
            head_state,
            head_meta,
            params.backbone,
            params.compute,
            params.finetune,  # augment light
            scratch_dir=pipeline / "models",
            cache=True,
        )


def test_extract_copies_a_leaderboard_extraction_only_when_it_is_exactly_its_own(
    tmp_path, monkeypatch, image_folder, params_dict, write_params, caplog
):
    """compare_extract's folder for the same backbone and settings is copied by extract
    (--reuse-from), byte for byte; a candidate made with other weights, or a damaged one, is
    recomputed instead."""
    import logging

    caplog.set_level(logging.INFO)
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, params_dict)
    load_stage("prepare").main(["images", "prepared", "data.json"])
    name = params_dict["backbone"]["name"]
    load_stage("compare_extract").main(["images", "prepared", f"compare/{name}", name])
    assert (tmp_path / "compare" / name / "timing.json").is_file()
    extract = load_stage("extract")

    caplog.clear()
    extract.main(["images", "prepared", "copied", "--reuse-from", "compare"])
    assert "copied, not recomputed" in caplog.text
    candidate = sorted(p.name for p in (tmp_path / "compare" / name).glob("*_*.npy"))
    assert len(candidate) == 6
    assert sorted(p.name for p in (tmp_path / "copied").iterdir()) == sorted(
        [*candidate, "meta.json"]
    )
    for file in [*candidate, "meta.json"]:
        assert (tmp_path / "copied" / file).read_bytes() == (
            tmp_path / "compare" / name / file
        ).read_bytes(), file

    # A flipped byte in the candidate's features: its sha256 no longer matches, so recompute.
    damaged = tmp_path / "compare" / name / "train_features.npy"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    caplog.clear()
    extract.main(["images", "prepared", "recomputed", "--reuse-from", "compare"])
    assert "copied, not recomputed" not in caplog.text
    assert (tmp_path / "recomputed" / "train_features.npy").read_bytes() == (
        tmp_path / "copied" / "train_features.npy"
    ).read_bytes()

    # Other settings than the candidate's (here the input size): never copied.
    damaged.write_bytes((tmp_path / "copied" / "train_features.npy").read_bytes())
    params_dict["backbone"]["image_size"] = 64
    write_params(tmp_path, params_dict)
    caplog.clear()
    extract.main(["images", "prepared", "other", "--reuse-from", "compare"])
    assert "copied, not recomputed" not in caplog.text


def test_finetune_stage_runs_the_whole_recipe(
    pipeline, tmp_path, monkeypatch, params_dict, write_params, caplog
):
    """Every recipe key at once on real images: strong augmentation, MixUp and CutMix, the
    balanced sampler and class weights, layer decay, weight EMA, stochastic depth, and the
    best epoch chosen by macro-F1; the checkpoint records them and evaluate scores the model."""
    import shutil

    work = shutil.copytree(pipeline, tmp_path / "work")
    recipe = {
        "augment": "strong",
        "mixup": 0.2,
        "cutmix": 1.0,
        "sampler": "balanced",
        "class_weight": "balanced",
        "layer_decay": 0.7,
        "ema": 0.9,
        "drop_path": 0.1,
        "select": "macro_f1",
        "unfreeze": 2,
        "epochs": 2,
    }
    params_dict["finetune"] |= recipe
    params_dict["evaluate"]["tta"] = "none"
    write_params(work, params_dict)
    monkeypatch.chdir(work)
    with caplog.at_level("INFO", logger="headstart"):
        load_stage("finetune").main(STAGE_ARGV["finetune"])
    assert "augment strong with MixUp/CutMix, unfreeze 2 of 8 blocks" in caplog.text
    assert "weight EMA: decay 0.9" in caplog.text
    assert "param group backbone_block6" in caplog.text  # one group per block: layer decay
    assert "val macro f1" in caplog.text
    _, meta = load_classifier(work / "models/finetuned.pt")
    assert {k: meta["params"]["finetune"][k] for k in recipe} == recipe
    assert "best_val_macro_f1" in meta["summary"]
    summary = _read_json(work / "dvclive/finetune/metrics.json")
    assert 0.0 <= summary["best_val_macro_f1"] <= 1.0
    load_stage("evaluate").main(STAGE_ARGV["evaluate"])
    metrics = _read_json(work / "metrics/evaluate.json")
    assert 0.0 <= metrics["finetuned"]["balanced_accuracy"] <= 1.0
