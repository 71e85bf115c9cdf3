"""Stage prepare: index an ImageFolder and split it into train/val/test.

    python stages/prepare.py DATA_DIR PREPARED_DIR DATA_METRICS

Writes PREPARED_DIR/index.csv (path relative to DATA_DIR, label, split, sha256, width, height),
PREPARED_DIR/classes.json, PREPARED_DIR/report.json (counts per class and split, every skipped
file with its reason) and DATA_METRICS (the counts, for `dvc metrics diff`). Reads params: data.
"""

import argparse
import logging
from pathlib import Path

from headstart.data import INDEX_HEADER, SKIP_REASONS, SPLITS, prepare_index
from headstart.io import write_csv, write_json
from headstart.params import load_params
from headstart.stage import run

log = logging.getLogger("headstart.prepare")
MAX_ROWS = 30  # classes listed in the summary; report.json has them all


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("prepared_dir", type=Path)
    parser.add_argument("data_metrics", type=Path)
    args = parser.parse_args(argv)
    params = load_params().data

    classes, rows, report = prepare_index(
        args.data_dir, params.val_fraction, params.test_fraction, params.seed
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
        },
    )
    _summary(report)


def _summary(report: dict) -> None:
    width = min(max(len(c) for c in report["counts"]), 40) + 2
    lines = [f"{'class':<{width}}" + "".join(f"{s:>8}" for s in SPLITS)]
    shown = list(report["counts"].items())
    for label, counts in shown[:MAX_ROWS]:
        lines.append(f"{label:<{width}}" + "".join(f"{counts[s]:>8}" for s in SPLITS))
    if len(shown) > MAX_ROWS:
        lines.append(f"... {len(shown) - MAX_ROWS} more classes (see report.json)")
    lines.append(f"{'total':<{width}}" + "".join(f"{report['splits'][s]:>8}" for s in SPLITS))
    log.info(
        "%d images in %d classes:\n%s",
        report["num_images"],
        report["num_classes"],
        "\n".join(lines),
    )
    if report["multi_frame"] or report["exif_errors"]:
        log.info(
            "%d animated file(s) used at frame 0; %d with unreadable EXIF orientation",
            report["multi_frame"],
            report["exif_errors"],
        )
    if report["num_skipped"]:
        for reason, count in report["skipped_by_reason"].items():
            log.warning("skipped %d file(s): %s (%s)", count, reason, SKIP_REASONS[reason])
        log.warning("every skipped file, with its reason, is listed in report.json")


if __name__ == "__main__":
    raise SystemExit(run(main))
