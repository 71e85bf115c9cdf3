"""The model card's content, from hand-made inputs: what a reader needs, nothing that varies."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from headstart.folders import SPLITS
from headstart.index import Images
from headstart.metrics import (
    average_precision_by_class,
    classification_report,
    confusion_counts,
    most_confused,
    precision_recall_records,
)
from headstart.report import data_fingerprint, render_model_card, wilson_interval

CLASSES = ["cat", "dog", "fox|wolf"]  # a pipe, which a Markdown table must escape
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
FINETUNED = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 2])  # cat->dog once, fox|wolf->dog once
HEAD = np.array([0, 0, 1, 1, 1, 1, 0, 1, 1, 1])
ENVIRONMENT = {
    "python": "3.11.7",
    "packages": {"torch": "2.14.1", "torchvision": "0.29.1", "dvc": "3.67.1"},
    "platform": "Linux x86_64",
    "cpu": "Some CPU",
    "cpu_capability": "AVX2",
    "torch_threads": 2,
    "device": "cpu",
}


def _images(rows: list[dict[str, str]], classes: list[str]) -> Images:
    """Index rows (path, sha256, label and split by name) as the columns load_prepared gives."""
    return Images(
        [r["path"] for r in rows],
        np.array([classes.index(r["label"]) for r in rows], dtype=np.int64),
        np.array([SPLITS.index(r["split"]) for r in rows], dtype=np.int8),
        np.array([r["sha256"].encode() for r in rows], dtype="S64"),
    )


def _inputs(calibrated: bool = True) -> dict:
    reports = {
        "head": classification_report(Y_TRUE, HEAD, CLASSES),
        "finetuned": classification_report(Y_TRUE, FINETUNED, CLASSES),
    }
    metrics = {
        name: {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "ece": 0.1}
        for name, r in reports.items()
    }
    metrics["finetuned"] |= {"ece_calibrated": 0.05 if calibrated else 0.1, "temperature": 0.8}
    metrics["test_images"] = len(Y_TRUE)
    calibration = {"fitted": calibrated, "temperature": 0.8 if calibrated else 1.0}
    if calibrated:
        calibration |= {"val_images": 9, "val_nll_before": 0.5, "val_nll_after": 0.4}
    rows = [
        {"path": f"{i}.png", "sha256": f"{i:064x}", "label": CLASSES[i % 3], "split": "train"}
        for i in range(30)
    ]
    return {
        "model_meta": {
            "backbone": "resnet18",
            "classes": CLASSES,
            "image_size": 96,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "params": {
                "backbone": {"name": "resnet18", "weights": "pretrained", "image_size": "auto"},
                "finetune": {"unfreeze": 2, "lr_head": 0.001},
            },
            "summary": {"best_epoch": 4, "val_accuracy": 0.9},
        },
        "head_meta": {
            "params": {"kind": "linear", "lr": 0.003},
            "summary": {"best_epoch": 7, "best_val_accuracy": 0.8},
        },
        "model_file": {
            "path": "models/finetuned.pt",
            "sha256": "ab" * 32,
            "num_parameters": 1234567,
        },
        "data": {
            "dir": "data/raw",
            "fingerprint": data_fingerprint(_images(rows, CLASSES), CLASSES),
            "report": {
                "layout": "class folders",
                "num_images": 40,
                "num_classes": 3,
                "num_skipped": 2,
                "skipped_by_reason": {"hidden": 1, "truncated": 1},
                "splits": {"train": 24, "val": 6, "test": 10},
                "counts": {
                    "cat": {"train": 8, "val": 2, "test": 4},
                    "dog": {"train": 8, "val": 2, "test": 4},
                    "fox|wolf": {"train": 8, "val": 2, "test": 2},
                },
            },
        },
        "metrics": metrics,
        "reports": reports,
        "confused": most_confused(confusion_counts(Y_TRUE, FINETUNED, 3), CLASSES),
        "calibration": calibration | {"file": "models/finetuned.calibration.json"},
        "environment": {
            "extract": ENVIRONMENT,
            "finetune": ENVIRONMENT | {"device": "cuda", "gpu": "NVIDIA H200"},
            "train_head": None,
        },
    }


def test_card_sections_and_numbers():
    card = render_model_card(**_inputs())
    assert card.startswith("# Model card: resnet18 fine-tuned on 3 classes\n")
    headings = [line for line in card.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Model",
        "## Data",
        "## Training",
        "## Test metrics (10 images)",
        "## Most confused classes (fine-tuned, test)",
        "## Calibration",
        "## Environment",
    ]
    # Model and data
    assert "| backbone weights | `pretrained` |" in card
    assert "| parameters | 1,234,567 |" in card
    assert "| cat | 8 | 2 | 4 | 14 |" in card
    assert "| fox\\|wolf | 8 | 2 | 2 | 12 |" in card  # the pipe escaped
    assert "| **total** | 24 | 6 | 10 | 40 |" in card
    assert "Skipped: 1 hidden, 1 truncated" in card
    assert "Data audit" in card and "[audit.md](audit.md)" in card  # the audit's own page
    assert _inputs()["data"]["fingerprint"] in card
    # Params of every stage, metrics of both models
    assert "| `finetune.unfreeze` | `2` |" in card and "| `head.lr` | `0.003` |" in card
    assert "| fine-tuned | 0.8000 |" in card and "| head on cached features | 0.5000 |" in card
    # Confusions, largest first, with the share of the actual class
    assert "| cat | dog | 1 | 25.0% |" in card
    assert "| fox\\|wolf | dog | 1 | 50.0% |" in card
    # Calibration
    assert "| fine-tuned, temperature 0.8000 | 0.0500 |" in card
    assert "underconfident" in card
    # Environment: a missing record is a dash; a GPU shows when one was used
    assert "|  | extract | train_head | finetune |" in card
    assert "| device | cpu | – | cuda |" in card
    assert "| gpu | – | – | NVIDIA H200 |" in card


def test_card_without_calibration_and_without_mistakes():
    inputs = _inputs(calibrated=False)
    inputs["confused"] = []
    card = render_model_card(**inputs)
    assert "No temperature fitted (`evaluate.calibrate: false`)" in card
    assert "temperature 1.0000" not in card
    assert "No test image was misclassified." in card


def test_card_is_deterministic_and_has_no_dates():
    first, second = render_model_card(**_inputs()), render_model_card(**_inputs())
    assert first == second
    assert "202" not in first.replace("data", "")  # no year of a timestamp anywhere
    assert first.endswith("\n") and "\r" not in first


def test_data_fingerprint_ignores_order_and_paths():
    classes = ["a", "b"]
    rows = [
        {"path": "a/1.png", "sha256": "1" * 64, "label": "a", "split": "train"},
        {"path": "b/2.png", "sha256": "2" * 64, "label": "b", "split": "test"},
    ]
    moved = [r | {"path": "elsewhere/" + r["path"]} for r in reversed(rows)]
    fingerprint = data_fingerprint(_images(rows, classes), classes)
    assert fingerprint == data_fingerprint(_images(moved, classes), classes)
    relabelled = [rows[0], rows[1] | {"split": "val"}]
    assert fingerprint != data_fingerprint(_images(relabelled, classes), classes)


def test_data_fingerprint_is_the_recorded_formula():
    """Committed outputs (calibration.json, the model card) record the fingerprint: it stays
    sha256 over the sorted "sha256,label,split" lines, label and split by name."""
    rows = [
        {
            "path": f"{CLASSES[i % 3]}/{i}.png",
            "sha256": hashlib.sha256(str(i).encode()).hexdigest(),
            "label": CLASSES[i % 3],
            "split": SPLITS[i % 5 % 3],
        }
        for i in range(30)
    ]
    lines = sorted(f"{r['sha256']},{r['label']},{r['split']}" for r in rows)
    by_hand = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
    assert data_fingerprint(_images(rows, CLASSES), CLASSES) == by_hand
    # The value the rows-based function of earlier versions gave for these rows.
    assert by_hand == "6460fda2c9cc5dfdb535c55182bf8f626d4b112bc946ee2ece2dea214de8d626"


def test_wilson_interval():
    low, high = wilson_interval(95, 100)
    assert low == pytest.approx(0.8883, abs=1e-3) and high == pytest.approx(0.9785, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_most_confused_orders_by_count_then_class():
    counts = np.array([[5, 3, 1], [3, 6, 0], [0, 3, 2]])
    pairs = most_confused(counts, ["a", "b", "c"], top=3)
    assert [(p["actual"], p["predicted"], p["count"]) for p in pairs] == [
        ("a", "b", 3),
        ("b", "a", 3),
        ("c", "b", 3),
    ]
    assert pairs[2]["share"] == pytest.approx(0.6)


def test_card_says_when_the_probe_shipped_and_what_the_probe_scored():
    inputs = _inputs()
    inputs["model_meta"]["summary"] = {
        "best_epoch": 3,
        "val_accuracy": 0.9,
        "probe_val_accuracy": 0.8,
    }
    card = render_model_card(**inputs)
    assert "best epoch 3, validation accuracy 0.9000 (the probe it started as: 0.8000)." in card
    inputs["model_meta"]["summary"] = {
        "best_epoch": 0,
        "val_accuracy": 0.8,
        "probe_val_accuracy": 0.8,
    }
    card = render_model_card(**inputs)
    assert "no epoch beat the starting linear probe on validation (0.8000)" in card
    assert "the shipped model is the probe" in card


def test_balanced_accuracy_is_the_mean_recall_and_in_the_card():
    """A model that always answers the majority class: accuracy 0.9, balanced accuracy 0.5."""
    y_true = np.array([0] * 9 + [1])
    report = classification_report(y_true, np.zeros(10, dtype=int), ["common", "rare"])
    assert report["accuracy"] == 0.9
    assert report["balanced_accuracy"] == 0.5
    assert report["balanced_accuracy"] == pytest.approx(
        np.mean([report["per_class"][c]["recall"] for c in ("common", "rare")])
    )
    inputs = _inputs()
    inputs["metrics"]["finetuned"]["balanced_accuracy"] = 0.4321
    card = render_model_card(**inputs)
    assert "| balanced accuracy |" in card and "0.4321" in card


def test_precision_recall_curves_by_hand():
    """Six images, classes a (4 images), b (2) and c (none). Column a ranks two b images
    first: two points at (0, 0), one kept. Column b puts one b, three a, then the other b:
    the vertical run at recall 0.5 keeps only its ends (precision 1 and 1/4)."""
    y_true = np.array([0, 0, 1, 1, 0, 0])
    probabilities = np.array(
        [
            # a,   b,   c
            [0.7, 0.8, 0.1],
            [0.6, 0.7, 0.2],
            [0.9, 0.9, 0.3],
            [0.8, 0.5, 0.4],
            [0.5, 0.6, 0.5],
            [0.4, 0.4, 0.6],
        ]
    )
    records = precision_recall_records(probabilities, y_true, ["a", "b", "c"])
    points = [(r["class"], r["recall"], r["precision"]) for r in records]
    assert points == [
        ("a", 0.0, 1.0),
        ("a", 0.0, 0.0),
        ("a", 0.25, 0.3333),
        ("a", 0.5, 0.5),
        ("a", 0.75, 0.6),
        ("a", 1.0, 0.6667),
        ("b", 0.0, 1.0),
        ("b", 0.5, 1.0),
        ("b", 0.5, 0.25),
        ("b", 1.0, 0.4),
        ("b", 1.0, 0.3333),
    ]  # no curve for c: it has no image
    assert precision_recall_records(probabilities, y_true, ["a", "b", "c"]) == records
    # Step-wise area: a 0.25 x (1/3 + 1/2 + 3/5 + 2/3); b 0.5 x 1 + 0.5 x 0.4.
    assert average_precision_by_class(probabilities, y_true, ["a", "b", "c"]) == {
        "a": 0.525,
        "b": 0.7,
        "c": None,
    }


def test_card_names_the_test_time_augmentation():
    inputs = _inputs()
    assert "| test-time augmentation | none |" in render_model_card(**inputs)
    inputs["calibration"]["tta"] = "flip"
    card = render_model_card(**inputs)
    assert "| test-time augmentation | flip: the mean of the logits of each image" in card


def test_card_states_the_audit_counts_and_links_its_reports():
    """With the audit's metrics (evaluate --audit), the card gives its counts, each beside the
    report that lists them; without, it only links the audit's summary."""
    audit = {
        "label_issues": 12,
        "near_duplicates": {"groups": 7, "cross_split": 3, "cross_class": 1},
        "outliers": 2,
        "cv_accuracy": {"mean": 0.956868, "std": 0.006634, "folds": 5},
    }
    card = render_model_card(**_inputs(), audit=audit)
    line = next(line for line in card.splitlines() if line.startswith("Data audit"))
    assert "12 likely label mistakes ([label_issues.csv](label_issues.csv))" in line
    assert "7 groups of near-duplicates (3 across splits, 1 across classes" in line
    assert "2 outliers ([outliers.csv](outliers.csv))" in line
    assert "0.9569 ± 0.0066 over 5 folds" in line
    assert "[audit.md](audit.md)" in line
    plain = render_model_card(**_inputs())
    assert "Data audit (likely label mistakes, near-duplicates" in plain
    assert "likely label mistakes ([" not in plain
