"""Stage audit: likely label mistakes, near-duplicates and outliers, from the cached features.

    python stages/audit.py DATA_DIR PREPARED_DIR FEATURES_DIR METRICS REPORTS_DIR PLOTS_DIR

Writes REPORTS_DIR/{label_issues,near_duplicates,outliers}.csv and audit.md, PLOTS_DIR/
{label_issues,near_duplicates,outliers}.png and METRICS (the counts and the cross-validated
accuracy, for `dvc metrics diff`). Nothing trains on these: the stage is off the main path.
Reads params: audit (docs/audit.md).
"""

import argparse
import logging
from pathlib import Path

import _bootstrap  # noqa: F401  (first: a clear message outside the environment)

from headstart.audit import audit, read_audit_data
from headstart.audit_report import audit_outputs
from headstart.index import load_prepared
from headstart.io import write_bytes, write_csv, write_json, write_text
from headstart.params import load_params
from headstart.stage import run

log = logging.getLogger("headstart.audit")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("data_dir", "prepared_dir", "features_dir", "metrics", "reports_dir", "plots"):
        parser.add_argument(name, type=Path)
    args = parser.parse_args(argv)
    params = load_params().audit

    data = read_audit_data(load_prepared(args.data_dir, args.prepared_dir), args.features_dir)
    outputs = audit_outputs(audit(data, params), args.data_dir, params.max_shown)
    for name, (header, rows) in outputs.tables.items():
        write_csv(args.reports_dir / name, header, rows)
    for name, picture in outputs.pictures.items():
        write_bytes(args.plots / name, picture)
    write_text(args.reports_dir / "audit.md", outputs.summary)
    write_json(args.metrics, outputs.metrics)
    found = outputs.metrics
    log.info(
        "%d likely label mistakes, %d near-duplicate groups (%d across splits), %d outliers; "
        "cross-validated accuracy %.4f ± %.4f (reports in %s)",
        found["label_issues"],
        found["near_duplicates"]["groups"],
        found["near_duplicates"]["cross_split"],
        found["outliers"],
        found["cv_accuracy"]["mean"],
        found["cv_accuracy"]["std"],
        args.reports_dir,
    )


if __name__ == "__main__":
    raise SystemExit(run(main))
