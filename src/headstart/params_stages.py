"""Params sections of the stages off the main path (the audit), kept apart from params.py so
each module stays one screenful of jobs. Parsed by headstart.params like every section."""

from __future__ import annotations

from dataclasses import dataclass

from headstart.params_types import check, doc

# Folds of the audit's cross-validation: 2 is the least that gives every image an out-of-sample
# probability; beyond 20 each fit costs more and the estimates barely change.
MAX_FOLDS = 20
# Images in each of the audit's pictures: beyond this a grid is too large to read.
MAX_SHOWN = 100


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
