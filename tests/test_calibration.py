"""Calibration: ECE on cases worked by hand, the temperature fit, the calibration file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headstart.calibration import (
    calibration_path,
    calibration_record,
    expected_calibration_error,
    fit_temperature,
    read_temperature,
    reliability_bins,
    softmax,
)
from headstart.io import write_json


def test_ece_is_zero_when_confidence_matches_accuracy():
    # Four images at confidence 0.75, three of them right: accuracy 0.75 in that bin.
    probabilities = np.array([[0.75, 0.25]] * 4)
    labels = np.array([0, 0, 0, 1])
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.0)


def test_ece_by_hand():
    # Bin (0.6, 0.667]: two images at 0.65, one right -> |0.5 - 0.65| = 0.15, weight 2/4.
    # Bin (0.933, 1]: two images at 0.95, both right -> |1.0 - 0.95| = 0.05, weight 2/4.
    probabilities = np.array([[0.65, 0.35], [0.35, 0.65], [0.95, 0.05], [0.05, 0.95]])
    labels = np.array([0, 0, 0, 1])
    assert expected_calibration_error(probabilities, labels) == pytest.approx(
        0.5 * 0.15 + 0.5 * 0.05
    )
    # Always right at confidence 1: perfectly calibrated; always wrong at 1: ECE 1.
    one_hot = np.eye(3)[[0, 1, 2]]
    assert expected_calibration_error(one_hot, np.array([0, 1, 2])) == pytest.approx(0.0)
    assert expected_calibration_error(one_hot, np.array([1, 2, 0])) == pytest.approx(1.0)


def test_reliability_bins_are_equal_width_and_cover_every_image():
    rng = np.random.default_rng(0)
    probabilities = softmax(rng.normal(0, 3, (200, 5)))
    labels = rng.integers(0, 5, 200)
    bins = reliability_bins(probabilities, labels)
    assert len(bins) == 15
    assert [b["lower"] for b in bins] == pytest.approx([i / 15 for i in range(15)], abs=1e-6)
    assert sum(b["count"] for b in bins) == 200
    for b in bins:
        if b["count"]:
            assert b["lower"] < b["confidence"] <= b["upper"]
        else:
            assert b["accuracy"] is None and b["confidence"] is None
    # Upper edges are inclusive: 0.5 of two classes in bin 7 ((0.467, 0.533]), 1.0 in the last.
    edge = reliability_bins(np.array([[0.5, 0.5], [1.0, 0.0]]), np.array([0, 0]))
    assert edge[7]["count"] == 1 and edge[14]["count"] == 1


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_temperature_fit_recovers_a_known_temperature(true_temperature):
    """Labels drawn from softmax(z / T): the NLL-optimal temperature for logits z is T."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 3.0, (20000, 4))
    probabilities = softmax(logits, true_temperature)
    labels = np.array([rng.choice(4, p=p) for p in probabilities])
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    # And it lowers the ECE of the logits taken at face value.
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits, fitted), labels)
    assert after < before / 2


def test_temperature_scaling_keeps_the_argmax():
    logits = np.random.default_rng(2).normal(0, 2, (100, 7))
    for temperature in (0.1, 0.7, 3.0):
        scaled = softmax(logits, temperature)
        assert (scaled.argmax(1) == logits.argmax(1)).all()
        assert not np.allclose(scaled, softmax(logits))


def test_calibration_file_belongs_to_its_model(tmp_path):
    model = tmp_path / "finetuned.pt"
    model.write_bytes(b"weights v1")
    path = calibration_path(model)
    assert path == tmp_path / "finetuned.calibration.json"
    write_json(path, calibration_record(model, 0.8, True, {"fitted_on": "val"}))
    assert read_temperature(path, model) == pytest.approx(0.8)
    model.write_bytes(b"weights v2")  # finetune reran, evaluate did not
    with pytest.raises(ValueError, match="another version"):
        read_temperature(path, model)


def test_fit_is_deterministic():
    logits = torch.randn(300, 3, generator=torch.Generator().manual_seed(3)).numpy() * 4
    labels = np.random.default_rng(3).integers(0, 3, 300)
    assert fit_temperature(logits, labels) == fit_temperature(logits, labels)
