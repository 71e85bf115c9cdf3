"""Stage prepare: index an ImageFolder and split it into train/val/test.

    python stages/prepare.py DATA_DIR PREPARED_DIR DATA_METRICS

Writes PREPARED_DIR/index.csv (path relative to DATA_DIR, label, split, sha256, width, height),
PREPARED_DIR/classes.json, PREPARED_DIR/report.json (counts per class and split, every skipped
file with its reason) and DATA_METRICS (the counts, for `dvc metrics diff`). Reads params: data.
"""

import argparse
import logging
from pathlib import Path

import _bootstrap  # noqa: F401  (first: a clear message outside the environment)

from headstart.index import INDEX_HEADER, prepare_index, summary
from headstart.io import write_csv, write_json
from headstart.params import load_params
from headstart.stage import run

log = logging.getLogger("headstart.prepare")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("prepared_dir", type=Path)
    parser.add_argument("data_metrics", type=Path)
    args = parser.parse_args(argv)
    params = load_params().data

    classes, rows, report = prepare_index(
        args.data_dir, params.val_fraction, params.test_fraction, params.seed, params.near_copies
    )
    write_csv(args.prepared_dir / "index.csv", INDEX_HEADER, rows)
    write_json(args.prepared_dir / "classes.json", classes)
    write_json(args.prepared_dir / "report.json", report)
    write_json(
        args.data_metrics,
        {
            "images": report["num_images"],
            "classes": report["num_classes"],
            **report["splits"],
            "skipped": report["num_skipped"],
            "imbalance_ratio": report["imbalance_ratio"],
            "near_copy_groups": report["near_copy_groups"],
        },
    )
    summary(report)


if __name__ == "__main__":
    raise SystemExit(run(main))
