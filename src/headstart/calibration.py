"""Calibration: how far the probabilities are from the accuracies they claim, and a fix.

Expected calibration error (ECE, Guo et al. 2017): split the test images into 15 equal-width
bins of their top probability ("confidence"); ECE is the average over bins of
|accuracy - mean confidence|, weighted by the share of images in the bin. 0 is perfect; a model
that says 0.9 and is right 99% of the time (label smoothing does that) has an ECE near 0.09.

Temperature scaling divides the logits by one number T > 0 fitted on the validation split
(minimum negative log-likelihood). It never changes the predicted class, only how sure the
model says it is. The fitted T is stored in a small JSON file beside the model
(`<model>.calibration.json`), which `headstart predict` and `headstart export` apply.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headstart.errors import ArtifactError
from headstart.io import sha256_file
from headstart.schemas import check_calibration_record, read_json_file

log = logging.getLogger(__name__)

NUM_BINS = 15
CALIBRATION_FORMAT = 1
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, C) logits -> (N, C) float64 probabilities of softmax(logits / temperature)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)  # for exp's range; the softmax is unchanged
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def _bin_index(confidence: np.ndarray, num_bins: int) -> np.ndarray:
    """Bin b holds confidences in (b/num_bins, (b+1)/num_bins]; a confidence of 0 goes to bin 0."""
    return np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)


def reliability_bins(
    probabilities: np.ndarray, labels: np.ndarray, num_bins: int = NUM_BINS
) -> list[dict[str, Any]]:
    """One record per bin (empty bins included, with count 0): edges, count, accuracy and mean
    confidence of the images whose top probability falls in it."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    bins = _bin_index(confidence, num_bins)
    records = []
    for b in range(num_bins):
        members = bins == b
        count = int(members.sum())
        records.append(
            {
                "bin": b,
                "lower": round(b / num_bins, 6),
                "upper": round((b + 1) / num_bins, 6),
                "count": count,
                "accuracy": float(correct[members].mean()) if count else None,
                "confidence": float(confidence[members].mean()) if count else None,
            }
        )
    return records


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, num_bins: int = NUM_BINS
) -> float:
    """ECE over `num_bins` equal-width bins of the top probability (see the module docstring)."""
    total = len(labels)
    if total == 0:
        raise ValueError("expected_calibration_error: no samples")
    return float(
        sum(
            r["count"] / total * abs(r["accuracy"] - r["confidence"])
            for r in reliability_bins(probabilities, labels, num_bins)
            if r["count"]
        )
    )


def reliability_records(
    probabilities: np.ndarray, labels: np.ndarray, num_bins: int = NUM_BINS
) -> list[dict[str, Any]]:
    """The non-empty bins as DVC plot records {bin, confidence, accuracy, count}: a reliability
    diagram (x confidence, y accuracy; a calibrated model lies on the diagonal)."""
    return [
        {
            "bin": r["bin"],
            "confidence": round(r["confidence"], 6),
            "accuracy": round(r["accuracy"], 6),
            "count": r["count"],
        }
        for r in reliability_bins(probabilities, labels, num_bins)
        if r["count"]
    ]


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean cross-entropy of softmax(logits / temperature) against the labels."""
    logits_t = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    return float(
        torch.nn.functional.cross_entropy(
            logits_t / temperature, torch.as_tensor(np.asarray(labels), dtype=torch.long)
        )
    )


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 100) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T): LBFGS on log T (so T stays
    positive), in float64 from T = 1, deterministic for the same logits."""
    logits_t = torch.as_tensor(np.asarray(logits), dtype=torch.float64)  # (N, C)
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)  # (N,)
    if len(labels_t) == 0:
        raise ValueError("fit_temperature: no validation samples")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits_t / log_t.exp(), labels_t)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature):
        raise ValueError("fit_temperature: the fit diverged (are all logits finite?)")
    if temperature < MIN_TEMPERATURE or temperature > MAX_TEMPERATURE:
        # With no validation error at all the NLL keeps falling as T -> 0; with predictions no
        # better than chance it keeps falling as T grows. The bounds keep probabilities usable.
        why = (
            "too few validation errors to calibrate on"
            if temperature < MIN_TEMPERATURE
            else "validation predictions close to chance"
        )
        log.warning(
            "fitted temperature %.3g is outside [%g, %g]; clamped (%s)",
            temperature,
            MIN_TEMPERATURE,
            MAX_TEMPERATURE,
            why,
        )
    return min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE)


def calibrate(val_logits: np.ndarray, val_labels: np.ndarray) -> tuple[float, dict[str, Any]]:
    """Fit the temperature on validation logits; return it and what the fit did on val."""
    temperature = round(fit_temperature(val_logits, val_labels), 6)  # as stored in the file
    return temperature, {
        "fitted_on": "validation split",
        "val_images": int(len(val_labels)),
        "val_nll_before": round(negative_log_likelihood(val_logits, val_labels, 1.0), 6),
        "val_nll_after": round(negative_log_likelihood(val_logits, val_labels, temperature), 6),
        "val_ece_before": round(expected_calibration_error(softmax(val_logits), val_labels), 6),
        "val_ece_after": round(
            expected_calibration_error(softmax(val_logits, temperature), val_labels), 6
        ),
    }


def calibration_path(model_path: Path) -> Path:
    """models/finetuned.pt -> models/finetuned.calibration.json: where its calibration lives."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.calibration.json")


def calibration_record(
    model_path: Path, temperature: float, fitted: bool, summary: dict[str, Any]
) -> dict[str, Any]:
    """The JSON written beside the model: the temperature, which model file it belongs to (by
    sha256, so a stale file is noticed), and how it was obtained."""
    return {
        "format": CALIBRATION_FORMAT,
        "method": "temperature scaling" if fitted else "none (evaluate.calibrate: false)",
        "fitted": bool(fitted),
        "temperature": round(float(temperature), 6),
        "model": {"path": Path(model_path).name, "sha256": sha256_file(model_path)},
        **summary,
    }


def read_temperature(calibration_file: Path, model_path: Path) -> float:
    """The temperature in `calibration_file`, checked to belong to `model_path`."""
    record = check_calibration_record(
        calibration_file, read_json_file(calibration_file), CALIBRATION_FORMAT
    )
    expected = record["model"]["sha256"]
    if expected != sha256_file(model_path):
        raise ArtifactError(
            f"{calibration_file}: was fitted for another version of {model_path}; "
            "rerun evaluate (dvc repro) or pass --calibration none"
        )
    return float(record["temperature"])
