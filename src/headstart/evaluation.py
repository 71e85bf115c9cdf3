"""Evaluation: test metrics, calibration, plots and the model card, for the head on the cached
features and for the fine-tuned model on the test images.

`evaluate` computes everything and returns it; the stage writes the files. Inference runs in
float32 whatever compute.precision, as predict does. Test-time augmentation (evaluate.tta)
applies to the fine-tuned model on val (the temperature is fitted on those logits) and test;
the head on cached features is scored without: a feature vector has no mirror image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from headstart.calibration import (
    calibrate,
    calibration_record,
    expected_calibration_error,
    reliability_records,
    softmax,
)
from headstart.environment import describe
from headstart.errors import DataError
from headstart.familiarity import (
    LogitsAndFeatures,
    build_guard,
    foreign_images,
    guard_bytes,
    reference_sample,
    split_outputs,
    summary,
)
from headstart.figures import confusion_png, image_grid_png
from headstart.images import decode_image
from headstart.inference import run_inference
from headstart.loaders import image_loader
from headstart.metrics import (
    average_precision_by_class,
    classification_report,
    confusion_counts,
    confusion_records,
    most_confused,
    per_class_f1_records,
    precision_recall_records,
    worst_misclassified,
)
from headstart.model import load_classifier, load_head
from headstart.report import data_fingerprint, render_model_card
from headstart.runtime import resolve_device, set_threads
from headstart.schemas import read_checked_array, read_json_file
from headstart.transforms import decode_size, eval_transform, preprocessing

if TYPE_CHECKING:
    from headstart.familiarity import Guard
    from headstart.index import Images, PreparedData
    from headstart.params_stages import EvaluateParams

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """What evaluate writes. `plots`: JSON records by file name (for DVC's plot templates);
    `pictures`: PNG bytes by file name; the rest one file each."""

    metrics: dict[str, Any]
    per_class: dict[str, Any]
    environment: dict[str, Any]
    plots: dict[str, list[dict]]
    pictures: dict[str, bytes]
    calibration: dict[str, Any]
    model_card: str
    guard: bytes  # <model>.guard.safetensors (headstart.familiarity)


def evaluate(
    prepared: PreparedData,
    features_dir: Path,
    head_model: Path,
    finetuned_model: Path,
    *,
    device: str,
    num_workers: int,
    threads: int | str,
    batch_size: int,
    calibrate_temperature: bool,
    calibration_file: Path,
    tta: str,
    guard_settings: EvaluateParams,
    audit: dict[str, Any] | None = None,
) -> Evaluation:
    """Score the head (train_head's checkpoint, on the cached test features) and the fine-tuned
    model (on the test images, with the test-time augmentation `tta`, inference.TTA); fit a
    temperature on val when `calibrate_temperature`. `audit`: the audit stage's metrics, whose
    counts the model card states (None: it links the audit only). `calibration_file` is where the
    calibration will be written, named in the model card."""
    set_threads(threads)
    torch_device = resolve_device(device)
    classes = prepared.classes
    head, head_meta = load_head(head_model)
    model, meta = load_classifier(finetuned_model)
    for path, trained_for in (
        (head_model, head_meta["classes"]),
        (finetuned_model, meta["classes"]),
    ):
        if trained_for != classes:
            raise DataError(
                f"{path}: trained for classes {trained_for}, but the prepared data "
                f"has {classes}; rerun the pipeline (dvc repro)"
            )

    features_meta = read_json_file(features_dir / "meta.json")
    test_x = torch.from_numpy(read_checked_array(features_dir, "test_features.npy", features_meta))
    test_y = read_checked_array(features_dir, "test_labels.npy", features_meta)
    if test_x.ndim != 2 or test_x.shape[1] != head.in_features or test_y.shape != (len(test_x),):
        raise DataError(
            f"{features_dir}: test features {tuple(test_x.shape)} do not fit {head_model} "
            f"({head.in_features} features an image); rerun the pipeline (dvc repro)"
        )
    with torch.inference_mode():
        head_logits = head(test_x).numpy()  # (N, num_classes)
    head_pred = head_logits.argmax(1)
    # The fine-tuned model as it is scored (val and test), with the features the guard reads.
    scored = LogitsAndFeatures(model, tta)

    def outputs_of(images: Images, desc: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits, pooled features, labels) of the fine-tuned model over `images`."""
        loader = image_loader(
            prepared.root,
            images,
            eval_transform(**preprocessing(meta)),
            decode_size=decode_size(meta),
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=torch_device.type == "cuda",
        )
        outputs, labels = run_inference(
            scored, loader, torch_device, desc=desc, batch_size_key="inference.batch_size"
        )
        return *split_outputs(outputs, len(classes)), labels

    logits, test_features, labels = outputs_of(prepared.split("test"), "evaluate finetuned")
    if not (labels == test_y).all():
        raise DataError(
            f"{features_dir}: test labels differ from the prepared index; rerun extract (dvc repro)"
        )
    finetuned_pred = logits.argmax(1)
    reports = {
        name: classification_report(test_y, pred, classes)
        for name, pred in (("head", head_pred), ("finetuned", finetuned_pred))
    }

    val_logits, val_features, val_labels = outputs_of(prepared.split("val"), "evaluate val")
    if calibrate_temperature:
        temperature, fit_summary = calibrate(val_logits, val_labels)
    else:
        temperature, fit_summary = 1.0, {}
    train = prepared.split("train")
    train = train.subset(reference_sample(len(train.paths), guard_settings.guard_reference))
    _, train_features, _ = outputs_of(train, "evaluate train (guard reference)")
    guard = build_guard(
        train_features,
        val_features,
        guard_settings.guard_neighbours,
        guard_settings.guard_flag_rate,
    )
    guard_metrics = summary(guard, guard.scores(val_features), guard.scores(test_features))
    guard_metrics["foreign_caught"] = {
        name: _foreign_caught(scored, guard, meta, name, torch_device, batch_size)
        for name in guard_settings.guard_foreign
    }
    probabilities = {
        "head": softmax(head_logits),
        "finetuned": softmax(logits),
        "calibrated": softmax(logits, temperature),
    }
    ece = {
        name: round(expected_calibration_error(p, test_y), 6) for name, p in probabilities.items()
    }
    metrics = {
        name: {
            "accuracy": r["accuracy"],
            "balanced_accuracy": r["balanced_accuracy"],
            "macro_f1": r["macro_f1"],
            "ece": ece[name],
        }
        for name, r in reports.items()
    }
    metrics["finetuned"] |= {
        "ece_calibrated": ece["calibrated"],
        "temperature": temperature,
        "tta": tta,
    }
    metrics["test_images"] = int(len(test_y))
    metrics["guard"] = guard_metrics
    fingerprint = data_fingerprint(prepared.images, classes)
    # Beside the model: the temperature predict and export apply, and (for `headstart info`)
    # what this evaluation measured on which data.
    calibration = calibration_record(
        finetuned_model,
        temperature,
        calibrate_temperature,
        fit_summary
        | {"tta": tta}  # the temperature fits these logits: predict --tta gives the same
        | {"test": metrics["finetuned"] | {"images": metrics["test_images"]}}
        | {"data_fingerprint": fingerprint},
    )
    # Which machine and software computed each step of this result (see headstart.environment).
    environment = {
        "extract": features_meta.get("environment"),
        "train_head": head_meta.get("environment"),
        "finetune": meta.get("environment"),
        "evaluate": describe(torch_device),
    }
    plots = {
        "confusion_head.json": confusion_records(test_y, head_pred, classes),
        "confusion_finetuned.json": confusion_records(test_y, finetuned_pred, classes),
        **{
            f"reliability_{name}.json": reliability_records(p, test_y)
            for name, p in probabilities.items()
        },
        "per_class_f1.json": per_class_f1_records(reports, classes),
        # The fine-tuned model's from the calibrated probabilities, which predict gives. The
        # temperature keeps each image's top class but can reorder the images within one
        # class's column a little (each image's softmax has its own denominator).
        "precision_recall_head.json": precision_recall_records(
            probabilities["head"], test_y, classes
        ),
        "precision_recall_finetuned.json": precision_recall_records(
            probabilities["calibrated"], test_y, classes
        ),
    }
    counts = confusion_counts(test_y, finetuned_pred, len(classes))
    pictures = {
        "confusion_finetuned.png": confusion_png(
            counts, classes, f"Test confusion matrix, fine-tuned ({len(test_y)} images)"
        ),
        "worst_misclassified.png": _worst_picture(
            prepared, probabilities["calibrated"], test_y, finetuned_pred
        ),
    }
    model_card = render_model_card(
        model_meta=meta,
        head_meta=head_meta,
        model_file={
            "path": str(finetuned_model),
            "sha256": calibration["model"]["sha256"],
            "num_parameters": sum(p.numel() for p in model.parameters()),
        },
        data={"dir": str(prepared.root), "fingerprint": fingerprint, "report": prepared.report},
        metrics=metrics,
        reports=reports,
        confused=most_confused(counts, classes),
        calibration=calibration | {"file": str(calibration_file)},
        environment=environment,
        audit=audit,
    )
    log.info(
        "test ECE: head %.4f, fine-tuned %.4f, calibrated (T = %.3f) %.4f",
        ece["head"],
        ece["finetuned"],
        temperature,
        ece["calibrated"],
    )
    log.info(
        "test accuracy (%d images): head %.4f, fine-tuned %.4f (test-time augmentation: %s)",
        len(test_y),
        reports["head"]["accuracy"],
        reports["finetuned"]["accuracy"],
        tta,
    )
    # Per class: precision, recall, F1, support, and the average precision of the ranking.
    per_class = {}
    for name, p in (("head", probabilities["head"]), ("finetuned", probabilities["calibrated"])):
        average_precision = average_precision_by_class(p, test_y, classes)
        per_class[name] = {
            label: scores | {"average_precision": average_precision[label]}
            for label, scores in reports[name]["per_class"].items()
        }
    return Evaluation(
        metrics,
        per_class,
        environment,
        plots,
        pictures,
        calibration,
        model_card,
        guard_bytes(guard, finetuned_model),
    )


def _foreign_caught(
    scored: LogitsAndFeatures, guard: Guard, meta: dict, name: str, device, batch_size: int
) -> float:
    """The share of the foreign set `name` (familiarity.FOREIGN) the guard flags."""
    transform = eval_transform(**preprocessing(meta))
    images = [transform(image) for image in foreign_images(name, int(meta["image_size"]))]
    batches = [
        (torch.stack(images[i : i + batch_size]), torch.zeros(len(images[i : i + batch_size])))
        for i in range(0, len(images), batch_size)
    ]
    outputs, _ = run_inference(scored, batches, device, desc=f"evaluate guard ({name})")
    _, features = split_outputs(outputs, len(meta["classes"]))
    return round(float((~guard.familiar(guard.scores(features))).mean()), 6)


def _worst_picture(
    prepared: PreparedData, probabilities: np.ndarray, test_y: np.ndarray, predicted: np.ndarray
) -> bytes:
    """A grid of the test images the model got wrong most confidently, with their labels."""
    classes = prepared.classes
    test_paths = prepared.split("test").paths  # in test_y's order
    worst = worst_misclassified(probabilities, test_y)
    return image_grid_png(
        [decode_image(prepared.root / test_paths[i]).image for i in worst],
        [
            [
                f"predicted {classes[predicted[i]]} ({probabilities[i].max():.2f})",
                f"true {classes[test_y[i]]}",
                Path(test_paths[i]).name,
            ]
            for i in worst
        ],
        "Most confident mistakes, fine-tuned (test)",
    )
