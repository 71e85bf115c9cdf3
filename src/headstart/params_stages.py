"""Params sections of the last stages (evaluate, the audit), kept apart from params.py so each
module stays one screenful of jobs. Parsed by headstart.params like every section."""

from __future__ import annotations

from dataclasses import dataclass

from headstart.choices import FOREIGN, TTA
from headstart.params_types import check, doc

# Folds of the audit's cross-validation: 2 is the least that gives every image an out-of-sample
# probability; beyond 20 each fit costs more and the estimates barely change.
MAX_FOLDS = 20
# Images in each of the audit's pictures: beyond this a grid is too large to read.
MAX_SHOWN = 100


@dataclass(frozen=True)
class EvaluateParams:
    """Test metrics, calibration and the unfamiliar-image guard (read by evaluate)."""

    calibrate: bool = doc("Fit a temperature on the validation split; predict and export apply it.")
    tta: str = doc(
        f"Test-time augmentation of the fine-tuned model: {' | '.join(TTA)}. `flip`: the mean "
        "of the logits of the image and its mirror (only where a mirror image is the same "
        "class). The head, on cached features, is scored without."
    )
    guard_neighbours: int = doc(
        "k of the unfamiliar-image guard: an image's score is its mean feature distance to its "
        "k nearest train images (docs/using-the-model.md)."
    )
    guard_flag_rate: float = doc(
        "Share of the val images the guard flags as unfamiliar, in (0, 0.5): it sets the "
        "threshold; about this share of test images is flagged too."
    )
    guard_reference: int = doc(
        "Most train images the guard keeps as its reference (a seeded sample when there are "
        "more): the guard file holds their features, 2 bytes a number."
    )
    guard_foreign: list[str] = doc(
        f"Foreign image sets evaluate measures the guard on: any of {', '.join(FOREIGN)} "
        "(uniform noise, solid colours, crops of scikit-image's photos)."
    )

    def validate(self) -> None:
        check(self.tta in TTA, "evaluate.tta", f"must be one of {', '.join(TTA)}")
        check(self.guard_neighbours >= 1, "evaluate.guard_neighbours", "must be at least 1")
        check(0.0 < self.guard_flag_rate < 0.5, "evaluate.guard_flag_rate", "must be in (0, 0.5)")
        check(
            self.guard_reference >= self.guard_neighbours,
            "evaluate.guard_reference",
            "must be at least evaluate.guard_neighbours",
        )
        unknown = [name for name in self.guard_foreign if name not in FOREIGN]
        check(not unknown, "evaluate.guard_foreign", f"{unknown}: expected any of {list(FOREIGN)}")


@dataclass(frozen=True)
class AuditParams:
    """The data audit: label issues, near-duplicates, outliers (read by audit; docs/audit.md)."""

    folds: int = doc(
        "K of the stratified K-fold cross-validation that gives every train and val image an "
        f"out-of-sample probability (2 to {MAX_FOLDS}); every class needs at least K train+val "
        "images."
    )
    logreg_c: float = doc(
        "Inverse regularisation strength C of the cross-validated logistic regression, on "
        "standardised features (smaller: smoother, less confident probabilities)."
    )
    duplicate_threshold: float = doc(
        "Cosine similarity of two images' features above which they are near-duplicates, in "
        "(0, 1); calibrated on resized and re-encoded copies of the digits (docs/audit.md)."
    )
    neighbours: int = doc(
        "k of the outlier score: an image's mean feature distance to its k nearest train images."
    )
    outlier_fence: float = doc(
        "An image is an outlier when its score exceeds the train images' third quartile by this "
        "many interquartile ranges (Tukey's far-out fence is 3)."
    )
    max_shown: int = doc(
        f"Images (or pairs) drawn in each of the audit's pictures, 1 to {MAX_SHOWN}; the CSV "
        "reports list them all."
    )
    seed: int = doc("Seed of the folds and the logistic regression.")

    def validate(self) -> None:
        check(2 <= self.folds <= MAX_FOLDS, "audit.folds", f"must be in [2, {MAX_FOLDS}]")
        check(self.logreg_c > 0, "audit.logreg_c", "must be > 0")
        check(
            0 < self.duplicate_threshold < 1,
            "audit.duplicate_threshold",
            "must be in (0, 1): a cosine similarity",
        )
        check(self.neighbours >= 1, "audit.neighbours", "must be >= 1")
        check(self.outlier_fence > 0, "audit.outlier_fence", "must be > 0")
        check(1 <= self.max_shown <= MAX_SHOWN, "audit.max_shown", f"must be in [1, {MAX_SHOWN}]")
