"""Stage evaluate: test metrics and plots for the head alone and for the fine-tuned model.

    python stages/evaluate.py DATA_DIR PREPARED_DIR FEATURES_DIR HEAD_MODEL FINETUNED_MODEL \
        METRICS PER_CLASS ENVIRONMENT PLOTS_DIR

The head is scored on the cached test features, the fine-tuned model on the test images.
METRICS: {"head": {"accuracy", "macro_f1"}, "finetuned": {...}}; PER_CLASS: precision, recall,
F1 and support per class for both; ENVIRONMENT: the software and machine each stage ran
with (headstart.environment); PLOTS_DIR/confusion_{head,finetuned}.json: one record per
test image for DVC's confusion template. Reads params: compute.
"""

import argparse
import logging
from pathlib import Path

import torch

from headstart.data import eval_transform, image_loader, load_prepared
from headstart.environment import describe
from headstart.io import read_array, read_json, write_json
from headstart.metrics import classification_report, confusion_records
from headstart.model import load_classifier, load_head, resolve_device, set_threads
from headstart.params import load_params
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
    ):
        parser.add_argument(name, type=Path)
    args = parser.parse_args(argv)
    compute = load_params().compute
    set_threads(compute.threads)
    device = resolve_device(compute.device)  # float32, whatever compute.precision: as predict

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
        head_pred = head(test_x).argmax(1).numpy()

    loader = image_loader(
        args.data_dir,
        prepared.split("test"),
        prepared.class_to_index,
        eval_transform(meta["image_size"], meta["mean"], meta["std"]),
        decode_size=meta["image_size"],
        batch_size=compute.batch_size,
        num_workers=compute.num_workers,
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
    write_json(
        args.metrics,
        {
            name: {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"]}
            for name, r in reports.items()
        }
        | {"test_images": int(len(test_y))},
    )
    # Which machine and software computed each step of this result (see headstart.environment).
    write_json(
        args.environment,
        {
            "extract": read_json(args.features_dir / "meta.json").get("environment"),
            "train_head": head_meta.get("environment"),
            "finetune": meta.get("environment"),
            "evaluate": describe(device),
        },
    )
    write_json(args.per_class, {name: r["per_class"] for name, r in reports.items()})
    write_json(
        args.plots_dir / "confusion_head.json", confusion_records(test_y, head_pred, classes)
    )
    write_json(
        args.plots_dir / "confusion_finetuned.json",
        confusion_records(test_y, finetuned_pred, classes),
    )
    log.info(
        "test accuracy (%d images): head %.4f, fine-tuned %.4f",
        len(test_y),
        reports["head"]["accuracy"],
        reports["finetuned"]["accuracy"],
    )


if __name__ == "__main__":
    raise SystemExit(run(main))
