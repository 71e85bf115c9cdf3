"""Stage evaluate: test metrics and plots for the head alone and for the fine-tuned model.

    python stages/evaluate.py DATA_DIR PREPARED_DIR FEATURES_DIR HEAD_MODEL FINETUNED_MODEL \
        METRICS PER_CLASS ENVIRONMENT PLOTS_DIR CALIBRATION MODEL_CARD

The head is scored on the cached test features, the fine-tuned model on the test images.
METRICS: {"head": {"accuracy", "macro_f1", "ece"}, "finetuned": {..., "ece_calibrated",
"temperature"}}; PER_CLASS: precision, recall, F1 and support per class for both; ENVIRONMENT:
the software and machine each stage ran with (headstart.environment);
PLOTS_DIR/confusion_{head,finetuned}.json: one record per test image for DVC's confusion
template; PLOTS_DIR/reliability_{head,finetuned,calibrated}.json: reliability diagram bins;
PLOTS_DIR/per_class_f1.json; PLOTS_DIR/confusion_finetuned.png and worst_misclassified.png;
CALIBRATION: the temperature fitted on the validation split (1.0 with evaluate.calibrate:
false), which predict and export apply; MODEL_CARD: Markdown (headstart.report).
Reads params: compute (device, batch_size, num_workers, threads), evaluate.calibrate.
"""

import argparse
import logging
from pathlib import Path

import torch

from headstart.calibration import (
    calibrate,
    calibration_record,
    expected_calibration_error,
    reliability_records,
    softmax,
)
from headstart.data import eval_transform, image_loader, load_prepared
from headstart.environment import describe
from headstart.figures import confusion_png, image_grid_png
from headstart.images import decode_image
from headstart.io import read_array, read_json, write_bytes, write_json, write_text
from headstart.metrics import (
    classification_report,
    confusion_counts,
    confusion_records,
    most_confused,
    per_class_f1_records,
    worst_misclassified,
)
from headstart.model import load_classifier, load_head, resolve_device, set_threads
from headstart.params import load_params
from headstart.report import data_fingerprint, render_model_card
from headstart.stage import run
from headstart.train import run_inference

log = logging.getLogger("headstart.evaluate")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in (
        "data_dir",
        "prepared_dir",
        "features_dir",
        "head_model",
        "finetuned_model",
        "metrics",
        "per_class",
        "environment",
        "plots_dir",
        "calibration",
        "model_card",
    ):
        parser.add_argument(name, type=Path)
    args = parser.parse_args(argv)
    params = load_params()
    set_threads(params.compute.threads)
    # float32, whatever compute.precision: as predict
    device = resolve_device(params.compute.device)

    prepared = load_prepared(args.data_dir, args.prepared_dir)
    classes = prepared.classes
    head, head_meta = load_head(args.head_model)
    model, meta = load_classifier(args.finetuned_model)
    for path, trained_for in (
        (args.head_model, head_meta["classes"]),
        (args.finetuned_model, meta["classes"]),
    ):
        if trained_for != classes:
            raise ValueError(
                f"{path}: trained for classes {trained_for}, but the prepared data "
                f"has {classes}; rerun the pipeline (dvc repro)"
            )

    test_x = torch.from_numpy(read_array(args.features_dir / "test_features.npy"))
    test_y = read_array(args.features_dir / "test_labels.npy")
    with torch.inference_mode():
        head_logits = head(test_x).numpy()  # (N, num_classes)
    head_pred = head_logits.argmax(1)

    loader = image_loader(
        args.data_dir,
        prepared.split("test"),
        eval_transform(meta["image_size"], meta["mean"], meta["std"]),
        decode_size=meta["image_size"],
        batch_size=params.compute.batch_size,
        num_workers=params.compute.num_workers,
        pin_memory=device.type == "cuda",
    )
    logits, labels = run_inference(
        model, loader, device, desc="evaluate finetuned", batch_size_key="compute.batch_size"
    )
    if not (labels == test_y).all():
        raise ValueError(
            f"{args.features_dir}: test labels differ from {args.prepared_dir}; "
            "rerun extract (dvc repro)"
        )
    finetuned_pred = logits.argmax(1)

    reports = {
        name: classification_report(test_y, pred, classes)
        for name, pred in (("head", head_pred), ("finetuned", finetuned_pred))
    }

    # ---- Calibration: ECE of head and fine-tuned; a temperature fitted on val (issue 6).
    if params.evaluate.calibrate:
        val_logits, val_labels = run_inference(
            model,
            image_loader(
                args.data_dir,
                prepared.split("val"),
                eval_transform(meta["image_size"], meta["mean"], meta["std"]),
                decode_size=meta["image_size"],
                batch_size=params.compute.batch_size,
                num_workers=params.compute.num_workers,
                pin_memory=device.type == "cuda",
            ),
            device,
            desc="evaluate val (calibration)",
            batch_size_key="compute.batch_size",
        )
        temperature, fit_summary = calibrate(val_logits, val_labels)
    else:
        temperature, fit_summary = 1.0, {}
    probabilities = {
        "head": softmax(head_logits),
        "finetuned": softmax(logits),
        "calibrated": softmax(logits, temperature),
    }
    ece = {
        name: round(expected_calibration_error(p, test_y), 6) for name, p in probabilities.items()
    }
    metrics = {
        name: {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "ece": ece[name]}
        for name, r in reports.items()
    }
    metrics["finetuned"] |= {"ece_calibrated": ece["calibrated"], "temperature": temperature}
    metrics["test_images"] = int(len(test_y))
    write_json(args.metrics, metrics)
    fingerprint = data_fingerprint(prepared.images, classes)
    # Beside the model: the temperature predict and export apply, and (for `headstart info`)
    # what this evaluation measured on which data.
    calibration = calibration_record(
        args.finetuned_model,
        temperature,
        params.evaluate.calibrate,
        fit_summary
        | {"test": metrics["finetuned"] | {"images": metrics["test_images"]}}
        | {"data_fingerprint": fingerprint},
    )
    write_json(args.calibration, calibration)
    # Which machine and software computed each step of this result (see headstart.environment).
    environment = {
        "extract": read_json(args.features_dir / "meta.json").get("environment"),
        "train_head": head_meta.get("environment"),
        "finetune": meta.get("environment"),
        "evaluate": describe(device),
    }
    write_json(args.environment, environment)
    write_json(args.per_class, {name: r["per_class"] for name, r in reports.items()})
    write_json(
        args.plots_dir / "confusion_head.json", confusion_records(test_y, head_pred, classes)
    )
    write_json(
        args.plots_dir / "confusion_finetuned.json",
        confusion_records(test_y, finetuned_pred, classes),
    )
    # ---- Plots for people and the model card (issues 5 and 6).
    for name, p in probabilities.items():
        write_json(args.plots_dir / f"reliability_{name}.json", reliability_records(p, test_y))
    write_json(args.plots_dir / "per_class_f1.json", per_class_f1_records(reports, classes))
    counts = confusion_counts(test_y, finetuned_pred, len(classes))
    write_bytes(
        args.plots_dir / "confusion_finetuned.png",
        confusion_png(counts, classes, f"Test confusion matrix, fine-tuned ({len(test_y)} images)"),
    )
    test_paths = prepared.split("test").paths  # in test_y's order
    worst = worst_misclassified(probabilities["calibrated"], test_y)
    write_bytes(
        args.plots_dir / "worst_misclassified.png",
        image_grid_png(
            [decode_image(args.data_dir / test_paths[i]).image for i in worst],
            [
                [
                    f"predicted {classes[finetuned_pred[i]]} "
                    f"({probabilities['calibrated'][i].max():.2f})",
                    f"true {classes[test_y[i]]}",
                    Path(test_paths[i]).name,
                ]
                for i in worst
            ],
            "Most confident mistakes, fine-tuned (test)",
        ),
    )
    write_text(
        args.model_card,
        render_model_card(
            model_meta=meta,
            head_meta=head_meta,
            model_file={
                "path": str(args.finetuned_model),
                "sha256": calibration["model"]["sha256"],
                "num_parameters": sum(p.numel() for p in model.parameters()),
            },
            data={
                "dir": str(args.data_dir),
                "fingerprint": fingerprint,
                "report": prepared.report,
            },
            metrics=metrics,
            reports=reports,
            confused=most_confused(counts, classes),
            calibration=calibration | {"file": str(args.calibration)},
            environment=environment,
        ),
    )
    log.info(
        "test ECE: head %.4f, fine-tuned %.4f, calibrated (T = %.3f) %.4f",
        ece["head"],
        ece["finetuned"],
        temperature,
        ece["calibrated"],
    )
    log.info(
        "test accuracy (%d images): head %.4f, fine-tuned %.4f",
        len(test_y),
        reports["head"]["accuracy"],
        reports["finetuned"]["accuracy"],
    )


if __name__ == "__main__":
    raise SystemExit(run(main))
