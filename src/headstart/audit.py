"""The data audit: likely label mistakes, near-duplicates and outliers, found from the cached
features in seconds (the backbone already ran over every image in extract).

Pure functions on arrays; `audit` runs them all and returns an `Audit` (headstart.audit_report
turns it into the CSV reports, the pictures and the metrics). No N x N matrix is ever held:
near-duplicates are found tile by tile, outliers with a nearest-neighbour search.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from headstart.errors import DataError
from headstart.folders import SPLITS
from headstart.neighbours import TILE, nearest_distances, normalised
from headstart.schemas import read_checked_array, read_json_file

if TYPE_CHECKING:
    from headstart.index import PreparedData
    from headstart.params_stages import AuditParams

log = logging.getLogger(__name__)

# Near-duplicate pairs kept for the report; beyond it the threshold is far too low (groups are
# still complete: every pair above the threshold is joined, only the listing stops).
MAX_PAIRS = 100_000


@dataclass(frozen=True)
class AuditData:
    """Every indexed image, train then val then test, with its cached features."""

    paths: list[str]  # relative to data.dir
    labels: np.ndarray  # (N,) int64 class indices
    splits: np.ndarray  # (N,) int8 indices into SPLITS
    features: np.ndarray  # (N, D) float32
    classes: list[str]


def read_audit_data(prepared: PreparedData, features_dir: Path) -> AuditData:
    """The prepared index and extract's features of all three splits, checked to match."""
    meta = read_json_file(features_dir / "meta.json")
    paths, labels, splits, features = [], [], [], []
    for number, name in enumerate(SPLITS):
        images = prepared.split(name)
        x = read_checked_array(features_dir, f"{name}_features.npy", meta)
        y = read_checked_array(features_dir, f"{name}_labels.npy", meta)
        if x.ndim != 2 or len(x) != len(images) or not np.array_equal(y, images.labels):
            raise DataError(
                f"{features_dir}: the {name} features ({x.shape}) do not match the {len(images)} "
                f"{name} images of the prepared index; rerun extract (dvc repro extract)"
            )
        if not np.isfinite(x).all():
            raise DataError(f"{features_dir}: {name} features hold NaN or inf; rerun extract")
        paths += images.paths
        labels.append(y)
        splits.append(np.full(len(y), number, dtype=np.int8))
        features.append(x.astype(np.float32, copy=False))
    return AuditData(
        paths,
        np.concatenate(labels),
        np.concatenate(splits),
        np.concatenate(features),
        list(prepared.classes),
    )


def check_auditable(labels: np.ndarray, splits: np.ndarray, classes: list[str], folds: int):
    """Refuse, with the fix, data the cross-validation cannot split: no train images, fewer
    than two classes, or a class with fewer train+val images than folds."""
    if not (splits == SPLITS.index("train")).any():
        raise DataError("data/prepared: the train split has no images; rerun prepare")
    fitted = labels[splits != SPLITS.index("test")]
    counts = np.bincount(fitted, minlength=len(classes))
    if (counts > 0).sum() < 2:
        raise DataError(
            "data/prepared: the audit needs train+val images of at least two classes; "
            f"found {(counts > 0).sum()}"
        )
    for index in np.flatnonzero(counts < folds):
        raise DataError(
            f"data/prepared: class {classes[index]!r} has {counts[index]} train+val image(s), "
            f"fewer than audit.folds = {folds}: every fold needs one of each class; lower "
            f"audit.folds to {max(2, counts[index])} or add images to {classes[index]!r}"
        )


def logreg_probabilities(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    c: float,
    seed: int,
) -> np.ndarray:
    """(len(test_x), num_classes) probabilities of a logistic regression fitted on standardised
    train features; a class absent from train_y gets probability 0 (its column stays)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    present = np.unique(train_y)
    if len(present) < 2:
        raise DataError(
            f"a cross-validation fold holds only class {int(present[0])}: every fold needs two "
            "classes or more; lower audit.folds or add images to the other classes"
        )
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    model = LogisticRegression(C=c, max_iter=1000, random_state=seed)
    # One BLAS thread: lbfgs's small products gain nothing from more, and on a busy 2-core
    # machine threads spinning against each other made one digits fit 10.0 s instead of 0.44 s.
    with threadpool_limits(limits=1):
        model.fit((train_x - mean) / std, train_y)
    probabilities = np.zeros((len(test_x), num_classes))
    probabilities[:, model.classes_] = model.predict_proba((test_x - mean) / std)
    return probabilities


def out_of_sample_probabilities(
    data: AuditData, folds: int, c: float, seed: int
) -> tuple[np.ndarray, list[float], float]:
    """(N, C) probabilities each image was given by a model that never saw it, the accuracy
    of each fold, and the test accuracy of a model fitted on all of train+val.

    Train+val images: stratified K-fold (seeded) over train and val together. Test images:
    the model fitted on all of train+val, as a head is trained on train (and picked on val).
    """
    from sklearn.model_selection import StratifiedKFold

    check_auditable(data.labels, data.splits, data.classes, folds)
    num_classes = len(data.classes)
    fitted = np.flatnonzero(data.splits != SPLITS.index("test"))
    test = np.flatnonzero(data.splits == SPLITS.index("test"))
    x, y = data.features, data.labels
    probabilities = np.zeros((len(y), num_classes))
    accuracies = []
    kfold = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (inner_train, inner_test) in enumerate(kfold.split(x[fitted], y[fitted])):
        rows, held_out = fitted[inner_train], fitted[inner_test]
        p = logreg_probabilities(x[rows], y[rows], x[held_out], num_classes, c, seed)
        probabilities[held_out] = p
        accuracies.append(float((p.argmax(1) == y[held_out]).mean()))
        log.info("audit fold %d/%d: accuracy %.4f", fold + 1, folds, accuracies[-1])
    test_accuracy = float("nan")
    if len(test):
        p = logreg_probabilities(x[fitted], y[fitted], x[test], num_classes, c, seed)
        probabilities[test] = p
        test_accuracy = float((p.argmax(1) == y[test]).mean())
    return probabilities, accuracies, test_accuracy


def label_issues(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices of likely label mistakes, worst first; every image's label quality in [0, 1]),
    by cleanlab's confident learning on out-of-sample probabilities."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    # n_jobs=1: no worker processes on a shared machine, and the same answer every run.
    issues = find_label_issues(
        labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1
    )
    quality = get_label_quality_scores(labels, probabilities)
    return np.asarray(issues, dtype=np.int64), quality


def near_duplicate_pairs(
    features: np.ndarray, threshold: float, tile: int = TILE
) -> tuple[np.ndarray, np.ndarray, bool]:
    """((P, 2) index pairs i < j with cosine similarity >= threshold, their (P,) similarities,
    whether the listing stopped at MAX_PAIRS), from tile x tile blocks of the similarity
    matrix: the upper triangle only, never more than one tile in memory."""
    unit = normalised(features)
    pairs, similarities, count, truncated = [], [], 0, False
    for a in range(0, len(unit), tile):
        for b in range(a, len(unit), tile):
            block = unit[a : a + tile] @ unit[b : b + tile].T  # (tile, tile)
            if a == b:
                block = np.triu(block, k=1)  # each pair once, never an image with itself
            rows, cols = np.nonzero(block >= threshold)
            if not len(rows):
                continue
            found = np.stack([rows + a, cols + b], axis=1)
            keep = max(0, MAX_PAIRS - count)
            truncated |= len(found) > keep
            pairs.append(found[:keep])
            similarities.append(block[rows, cols][:keep])
            count += min(len(found), keep)
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32), False
    return np.concatenate(pairs).astype(np.int64), np.concatenate(similarities), truncated


def group_pairs(num_images: int, pairs: np.ndarray) -> np.ndarray:
    """(N,) group number of each image by union-find over the pairs: -1 for an image in no
    pair, else groups numbered 0, 1, ... in order of their first image."""
    parent = np.arange(num_images)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs.tolist():
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups = np.full(num_images, -1, dtype=np.int64)
    numbers: dict[int, int] = {}
    for i in np.unique(pairs).tolist():
        groups[i] = numbers.setdefault(root(i), len(numbers))
    return groups


def pair_kind(label_a: int, label_b: int, split_a: int, split_b: int) -> str:
    """`cross_split` (a leak), `cross_class` (a label conflict), both joined by `+`, or
    `within_class` (the same class and split: harmless, worth knowing)."""
    kinds = [
        k
        for k, on in (("cross_split", split_a != split_b), ("cross_class", label_a != label_b))
        if on
    ]
    return "+".join(kinds) or "within_class"


def outlier_scores(
    features: np.ndarray, splits: np.ndarray, neighbours: int, tile: int = TILE
) -> np.ndarray:
    """(N,) each image's mean Euclidean distance between unit-length features to its k nearest
    train images (itself excluded): large means unlike anything the head trains on.

    A train image finds itself first among k + 1 neighbours, and drops it. The same scores as
    scikit-learn's brute-force neighbours (tests/test_audit.py), 1.3x faster at 50,000 images
    (bench/audit.py)."""
    unit = normalised(features)
    train = np.flatnonzero(splits == SPLITS.index("train"))
    k = min(neighbours, len(train) - 1)
    if k < 1:
        raise DataError("data/prepared: the outlier score needs two train images or more")
    distances = nearest_distances(unit, unit[train], k + 1, tile)
    is_train = np.zeros(len(unit), dtype=bool)
    is_train[train] = True
    return np.where(is_train, distances[:, 1:].mean(1), distances[:, :k].mean(1))


def outlier_threshold(scores: np.ndarray, splits: np.ndarray, fence: float) -> float:
    """Tukey's fence over the train images' scores: Q3 + fence x IQR."""
    train = scores[splits == SPLITS.index("train")]
    q1, q3 = np.quantile(train, [0.25, 0.75])
    return float(q3 + fence * (q3 - q1))


@dataclass(frozen=True)
class Audit:
    """What the audit found, by index into `data`'s rows."""

    data: AuditData
    probabilities: np.ndarray  # (N, C) out of sample
    fold_accuracies: list[float]
    test_accuracy: float
    issues: np.ndarray  # (I,) likely label mistakes, worst first
    quality: np.ndarray  # (N,) label quality
    pairs: np.ndarray  # (P, 2) near-duplicate pairs
    similarities: np.ndarray  # (P,)
    pairs_truncated: bool
    groups: np.ndarray  # (N,) near-duplicate group, -1 for none
    scores: np.ndarray  # (N,) outlier score
    threshold: float  # outlier threshold
    outliers: np.ndarray  # (O,) most unusual first


def audit(data: AuditData, params: AuditParams) -> Audit:
    """Every check of the audit on one set of cached features."""
    probabilities, accuracies, test_accuracy = out_of_sample_probabilities(
        data, params.folds, params.logreg_c, params.seed
    )
    issues, quality = label_issues(data.labels, probabilities)
    pairs, similarities, truncated = near_duplicate_pairs(data.features, params.duplicate_threshold)
    if truncated:
        log.warning(
            "more than %d near-duplicate pairs: only the first are listed; is "
            "audit.duplicate_threshold (%g) too low?",
            MAX_PAIRS,
            params.duplicate_threshold,
        )
    scores = outlier_scores(data.features, data.splits, params.neighbours)
    threshold = outlier_threshold(scores, data.splits, params.outlier_fence)
    outliers = np.flatnonzero(scores > threshold)
    outliers = outliers[np.argsort(-scores[outliers], kind="stable")]
    return Audit(
        data,
        probabilities,
        accuracies,
        test_accuracy,
        issues,
        quality,
        pairs,
        similarities,
        truncated,
        group_pairs(len(data.labels), pairs),
        scores,
        threshold,
        outliers,
    )
