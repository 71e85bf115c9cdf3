"""Test-set metrics and the plot data DVC renders."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support, as plain JSON values."""
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 6),
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
