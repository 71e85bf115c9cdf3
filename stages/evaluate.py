"""Stage evaluate: test metrics and plots for the head alone and for the fine-tuned model.

    python stages/evaluate.py DATA_DIR PREPARED_DIR FEATURES_DIR HEAD_MODEL FINETUNED_MODEL \
        METRICS PER_CLASS ENVIRONMENT PLOTS_DIR CALIBRATION MODEL_CARD GUARD

The head is scored on the cached test features, the fine-tuned model on the test images
(with evaluate.tta). METRICS: {"head": {"accuracy", "macro_f1", "ece"}, "finetuned": {...,
"ece_calibrated", "temperature", "tta"}}; PER_CLASS: precision, recall, F1, support and average
precision per class for both; ENVIRONMENT: the software and machine each stage ran with;
PLOTS_DIR: confusion records for DVC's confusion template, reliability diagram bins, F1 per
class, precision-recall curves per class, and two PNG pictures; CALIBRATION: the temperature
fitted on val (1.0 with evaluate.calibrate: false), which predict and export apply;
MODEL_CARD: Markdown; GUARD: the unfamiliar-image guard (headstart.familiarity), whose val,
test and foreign-set shares go in METRICS under "guard". Reads params: compute.device,
compute.num_workers, compute.threads, inference.batch_size, evaluate.*.
"""

import argparse
from pathlib import Path

import _bootstrap  # noqa: F401  (first: a clear message outside the environment)

from headstart.evaluation import evaluate
from headstart.index import load_prepared
from headstart.io import write_bytes, write_json, write_text
from headstart.params import load_params
from headstart.schemas import read_json_file
from headstart.stage import run

OUTPUTS = "metrics per_class environment plots_dir calibration model_card guard".split()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("data_dir", "prepared_dir", "features_dir", "head_model", "finetuned_model"):
        parser.add_argument(name, type=Path)
    for name in OUTPUTS:
        parser.add_argument(name, type=Path)
    parser.add_argument(
        "--audit", type=Path, help="the audit stage's metrics/audit.json: its counts go in the card"
    )
    args = parser.parse_args(argv)
    params = load_params()

    result = evaluate(
        load_prepared(args.data_dir, args.prepared_dir),
        args.features_dir,
        args.head_model,
        args.finetuned_model,
        device=params.compute.device,
        num_workers=params.compute.num_workers,
        threads=params.compute.threads,
        batch_size=params.inference.batch_size,
        calibrate_temperature=params.evaluate.calibrate,
        calibration_file=args.calibration,
        tta=params.evaluate.tta,
        guard_settings=params.evaluate,
        audit=read_json_file(args.audit) if args.audit else None,
    )
    write_json(args.metrics, result.metrics)
    write_json(args.calibration, result.calibration)
    write_json(args.environment, result.environment)
    write_json(args.per_class, result.per_class)
    for name, records in result.plots.items():
        write_json(args.plots_dir / name, records)
    for name, picture in result.pictures.items():
        write_bytes(args.plots_dir / name, picture)
    write_text(args.model_card, result.model_card)
    write_bytes(args.guard, result.guard)


if __name__ == "__main__":
    raise SystemExit(run(main))
