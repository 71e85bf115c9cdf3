"""Test-set metrics and the plot data DVC renders."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_curve,
    precision_recall_fscore_support,
)


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy (the mean recall over the classes present), macro-F1 and
    per-class precision/recall/F1/support, as plain JSON values."""
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 6),
        "balanced_accuracy": round(float(balanced_accuracy_score(y_true, y_pred)), 6),
        "macro_f1": round(
            float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)), 6
        ),
        "per_class": {
            name: {
                "precision": round(float(precision[i]), 6),
                "recall": round(float(recall[i]), 6),
                "f1": round(float(f1[i]), 6),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
    }


def confusion_records(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> list[dict]:
    """One {actual, predicted} record per test image: DVC's `confusion` template input."""
    return [
        {"actual": classes[t], "predicted": classes[p]}
        for t, p in zip(y_true.tolist(), y_pred.tolist(), strict=True)
    ]


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64: row = actual class, column = predicted class."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return counts


def most_confused(counts: np.ndarray, classes: list[str], top: int = 5) -> list[dict]:
    """The `top` largest off-diagonal cells, largest first (ties by actual, then predicted):
    {actual, predicted, count, share} with share = count / test images of the actual class."""
    cells = [
        (int(counts[a, p]), a, p)
        for a in range(len(classes))
        for p in range(len(classes))
        if a != p and counts[a, p] > 0
    ]
    cells.sort(key=lambda cell: (-cell[0], cell[1], cell[2]))
    return [
        {
            "actual": classes[a],
            "predicted": classes[p],
            "count": count,
            "share": round(count / int(counts[a].sum()), 6),
        }
        for count, a, p in cells[:top]
    ]


def per_class_f1_records(reports: dict[str, dict], classes: list[str]) -> list[dict]:
    """One record per class with each model's test F1 ({class, head, finetuned}): the input of
    DVC's bar_horizontal template."""
    return [
        {"class": name, **{model: r["per_class"][name]["f1"] for model, r in reports.items()}}
        for name in classes
    ]


def precision_recall_records(
    probabilities: np.ndarray, y_true: np.ndarray, classes: list[str], decimals: int = 4
) -> list[dict]:
    """One-vs-rest precision-recall curve of each class, as flat DVC plot records
    {class, recall, precision}, class by class in `classes` order, each curve from recall 0
    (precision 1) up to recall 1; a class with no image in `y_true` has no curve.

    `probabilities` (N, num_classes): class c's column ranks the images, the images of class c
    are the positives (scikit-learn's precision_recall_curve). Points are rounded to `decimals`
    and only the corners of the curve are kept: scikit-learn drops the thresholds inside a
    vertical run (drop_intermediate) and a point equal to the one before it is dropped, so the
    file stays small and the drawn line is unchanged.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    y_true = np.asarray(y_true)
    records: list[dict] = []
    for index, name in enumerate(classes):
        positives = y_true == index
        if not positives.any():  # recall has no meaning without positives
            continue
        precision, recall, _ = precision_recall_curve(
            positives, probabilities[:, index], drop_intermediate=True
        )
        previous = None
        # scikit-learn orders the points by rising threshold (recall falling): reversed here.
        for r, p in zip(recall[::-1].tolist(), precision[::-1].tolist(), strict=True):
            point = (round(r, decimals), round(p, decimals))
            if point != previous:
                records.append({"class": name, "recall": point[0], "precision": point[1]})
            previous = point
    return records


def average_precision_by_class(
    probabilities: np.ndarray, y_true: np.ndarray, classes: list[str]
) -> dict[str, float | None]:
    """Each class's one-vs-rest average precision (the area under its precision-recall curve,
    scikit-learn's step-wise sum); None for a class with no image in `y_true`."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    y_true = np.asarray(y_true)
    return {
        name: round(float(average_precision_score(y_true == index, probabilities[:, index])), 6)
        if (y_true == index).any()
        else None
        for index, name in enumerate(classes)
    }


def worst_misclassified(probabilities: np.ndarray, y_true: np.ndarray, top: int = 16) -> list[int]:
    """Indices of the wrong predictions made with the highest confidence, most confident first
    (ties broken by index, so the choice is deterministic)."""
    probabilities = np.asarray(probabilities)
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    wrong = np.flatnonzero(predicted != np.asarray(y_true))
    order = sorted(wrong.tolist(), key=lambda i: (-float(confidence[i]), i))
    return order[:top]
