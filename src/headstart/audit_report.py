"""The audit's outputs from an `Audit`: CSV reports (one row per finding, worst first), the
metrics `dvc metrics diff` compares, pictures of the worst findings and a Markdown summary.

Nothing here depends on the date or the machine's paths, so a rerun on the same features
writes the same bytes and `git diff reports/` shows what cleaning changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.audit import Audit, pair_kind
from headstart.figures import image_grid_png
from headstart.folders import SPLITS
from headstart.images import decode_image
from headstart.report import wilson_interval

LABEL_ISSUES_HEADER = ["path", "given_label", "suggested_label", "label_quality", "split"]
NEAR_DUPLICATES_HEADER = [
    "group",
    "group_kind",
    "kind",
    "similarity",
    *(f"{column}_{side}" for side in "ab" for column in ("path", "label", "split")),
]
OUTLIERS_HEADER = ["path", "label", "split", "outlier_score", "threshold"]
# Order of the near-duplicate groups in the report: leaks first (they inflate the test score).
GROUP_ORDER = ("cross_split+cross_class", "cross_split", "cross_class", "within_class")
# Rows of the Markdown summary's table of label issues; the CSV has them all.
SUMMARY_ROWS = 10


@dataclass(frozen=True)
class AuditOutputs:
    tables: dict[str, tuple[list[str], list[list[str]]]]  # CSV name -> (header, rows)
    metrics: dict
    pictures: dict[str, bytes]  # PNG name -> bytes
    summary: str  # Markdown


def _pair_kind(found: Audit, i: int, j: int) -> str:
    data = found.data
    return pair_kind(data.labels[i], data.labels[j], data.splits[i], data.splits[j])


def _group_kinds(found: Audit) -> dict[int, str]:
    """Each near-duplicate group's kind: the flags of all its pairs together."""
    flags: dict[int, set[str]] = {}
    for i, j in found.pairs.tolist():
        flags.setdefault(int(found.groups[i]), set()).update(_pair_kind(found, i, j).split("+"))
    return {
        g: "+".join(k for k in ("cross_split", "cross_class") if k in f) or "within_class"
        for g, f in flags.items()
    }


def _pair_order(found: Audit, kinds: dict[int, str]) -> np.ndarray:
    """Pairs by their group's kind (GROUP_ORDER), then group, then similarity, highest first."""
    groups = found.groups[found.pairs[:, 0]] if len(found.pairs) else np.zeros(0, dtype=int)
    rank = np.array([GROUP_ORDER.index(kinds[int(g)]) for g in groups], dtype=np.int64)
    return np.lexsort((-found.similarities, groups, rank))


def audit_outputs(found: Audit, root: Path, max_shown: int) -> AuditOutputs:
    """Everything the audit stage writes, from what the audit found; `root` is data.dir (the
    pictures decode the images from there)."""
    data, classes = found.data, found.data.classes
    suggested = found.probabilities.argmax(1)

    def where(i: int) -> list[str]:
        return [data.paths[i], classes[data.labels[i]], SPLITS[data.splits[i]]]

    issue_rows = [
        [
            data.paths[i],
            classes[data.labels[i]],
            classes[suggested[i]],
            f"{found.quality[i]:.4f}",
            SPLITS[data.splits[i]],
        ]
        for i in found.issues.tolist()
    ]
    kinds = _group_kinds(found)
    order = _pair_order(found, kinds)
    # Groups renumbered 1, 2, ... in report order.
    number: dict[int, int] = {}
    for p in order.tolist():
        number.setdefault(int(found.groups[found.pairs[p, 0]]), len(number) + 1)
    pair_rows = []
    for p in order.tolist():
        i, j = found.pairs[p].tolist()
        group = int(found.groups[i])
        pair_rows.append(
            [
                str(number[group]),
                kinds[group],
                _pair_kind(found, i, j),
                f"{found.similarities[p]:.4f}",
                *where(i),
                *where(j),
            ]
        )
    outlier_rows = [
        [*where(i), f"{found.scores[i]:.4f}", f"{found.threshold:.4f}"]
        for i in found.outliers.tolist()
    ]
    metrics = _metrics(found, kinds)
    pictures = {
        "label_issues.png": _grid(
            root,
            data.paths,
            [
                (i, [f"given {classes[data.labels[i]]}", f"suggested {classes[suggested[i]]}"])
                for i in found.issues[:max_shown].tolist()
            ],
            f"Likely label mistakes, worst first ({len(found.issues)} in all)",
            "none: no label looks wrong",
        ),
        "near_duplicates.png": _pairs_picture(found, root, order, kinds, max_shown),
        "outliers.png": _grid(
            root,
            data.paths,
            [
                (
                    i,
                    [
                        f"score {found.scores[i]:.3f}",
                        f"{classes[data.labels[i]]}, {SPLITS[data.splits[i]]}",
                    ],
                )
                for i in found.outliers[:max_shown].tolist()
            ],
            f"Outliers: far from every train image ({len(found.outliers)} in all)",
            "none: no image is far from the train images",
        ),
    }
    return AuditOutputs(
        {
            "label_issues.csv": (LABEL_ISSUES_HEADER, issue_rows),
            "near_duplicates.csv": (NEAR_DUPLICATES_HEADER, pair_rows),
            "outliers.csv": (OUTLIERS_HEADER, outlier_rows),
        },
        metrics,
        pictures,
        _summary(found, metrics, issue_rows),
    )


def _metrics(found: Audit, kinds: dict[int, str]) -> dict:
    data = found.data
    accuracies = np.array(found.fold_accuracies)
    test = data.splits == SPLITS.index("test")
    correct = int(round(found.test_accuracy * test.sum())) if test.any() else 0
    low, high = wilson_interval(correct, int(test.sum()))
    counts = {kind: 0 for kind in ("cross_split", "cross_class", "within_class")}
    for kind in kinds.values():
        for part in kind.split("+"):
            counts[part] += 1
    return {
        "images": len(data.labels),
        "label_issues": len(found.issues),
        "near_duplicates": {
            "groups": len(kinds),
            **counts,
            "images": int((found.groups >= 0).sum()),
            "pairs": len(found.pairs),
            "pairs_truncated": found.pairs_truncated,
        },
        "outliers": len(found.outliers),
        "cv_accuracy": {
            "mean": round(float(accuracies.mean()), 6),
            "std": round(float(accuracies.std(ddof=1)), 6),
            "min": round(float(accuracies.min()), 6),
            "max": round(float(accuracies.max()), 6),
            "folds": len(accuracies),
            "images": int((~test).sum()),
        },
        "test_accuracy": {
            "value": round(found.test_accuracy, 6) if test.any() else None,
            "low": round(low, 6),
            "high": round(high, 6),
            "images": int(test.sum()),
        },
    }


def _grid(root: Path, paths: list[str], shown: list, title: str, empty: str) -> bytes:
    return image_grid_png(
        [decode_image(root / paths[i]).image for i, _ in shown],
        [[*lines, Path(paths[i]).name] for i, lines in shown],
        title,
        columns=6,
        empty=empty,
    )


def _pairs_picture(found: Audit, root: Path, order, kinds, max_shown: int) -> bytes:
    """The most similar pair of each group, leaks first, two tiles side by side."""
    shown, seen = [], set()
    data = found.data
    for p in order.tolist():
        i, j = found.pairs[p].tolist()
        if found.groups[i] in seen:
            continue
        seen.add(found.groups[i])
        kind = kinds[int(found.groups[i])]
        label = [f"{data.classes[data.labels[k]]}, {SPLITS[data.splits[k]]}" for k in (i, j)]
        shown += [(i, [kind, label[0]]), (j, [f"similarity {found.similarities[p]:.3f}", label[1]])]
        if len(shown) >= 2 * max_shown:
            break
    return _grid(
        root,
        data.paths,
        shown,
        f"Near-duplicates: the closest pair of each group ({len(kinds)} groups)",
        "none: no two images are near-duplicates",
    )


def _summary(found: Audit, metrics: dict, issue_rows: list[list[str]]) -> str:
    """reports/audit.md: the counts, the cross-validated accuracy and links to the reports."""
    cv, test, dup = metrics["cv_accuracy"], metrics["test_accuracy"], metrics["near_duplicates"]
    lines = [
        "# Data audit",
        "",
        "Written by the audit stage from the cached features (what each finding means and how "
        "to fix it: docs/audit.md in the headstart repository).",
        "",
        f"- **Likely label mistakes:** {metrics['label_issues']} of {metrics['images']} images "
        "([label_issues.csv](label_issues.csv), [picture](../plots/label_issues.png)).",
        f"- **Near-duplicate groups:** {dup['groups']}: {dup['cross_split']} across splits "
        f"(leaks), {dup['cross_class']} across classes (label conflicts), "
        f"{dup['within_class']} within one class and split "
        "([near_duplicates.csv](near_duplicates.csv), [picture](../plots/near_duplicates.png)).",
        f"- **Outliers:** {metrics['outliers']} ([outliers.csv](outliers.csv), "
        "[picture](../plots/outliers.png)).",
        f"- **Cross-validated accuracy** of a logistic-regression head, {cv['folds']} folds over "
        f"{cv['images']} train+val images: {cv['mean']:.4f} ± {cv['std']:.4f} (fold range "
        f"{cv['min']:.4f} to {cv['max']:.4f}).",
    ]
    if test["value"] is not None:
        lines.append(
            f"- **Test accuracy** of the same head fitted on all of train+val, "
            f"{test['images']} test images: {test['value']:.4f} (95% interval "
            f"{test['low']:.4f} to {test['high']:.4f}; one image is "
            f"{100 / test['images']:.2f} points)."
        )
    if issue_rows:
        lines += ["", "## Worst label issues", ""]
        lines += [
            "| path | given | suggested | label quality | split |",
            "| --- | --- | --- | ---: | --- |",
        ]
        for row in issue_rows[:SUMMARY_ROWS]:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines) + "\n"
