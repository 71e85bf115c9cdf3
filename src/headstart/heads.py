"""Head kinds: a classifier trained on the cached features, saved as one nn.Linear (D -> C).

Every kind returns the same layer, so finetune warm-starts from any of them. Kinds live in one
table, HEADS, that `head.kind` is validated against: adding a kind is adding a function here
(features, params, on_epoch) -> (head, summary), an entry, and its test.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from headstart.errors import DataError
from headstart.loaders import tensor_batches
from headstart.runtime import seed_everything
from headstart.schemas import check_features_meta, read_checked_array, read_json_file
from headstart.train import balanced_class_weight, fit

if TYPE_CHECKING:
    from headstart.params import HeadParams

log = logging.getLogger(__name__)

OnEpoch = Callable[[dict[str, float]], None] | None


@dataclass(frozen=True)
class Features:
    """Cached features of the train and val splits, and what extract recorded about them."""

    train_x: np.ndarray  # (N, D) float32
    train_y: np.ndarray  # (N,) int64 class indices
    val_x: np.ndarray
    val_y: np.ndarray
    meta: dict[str, Any]  # features_dir/meta.json: backbone, input size, classes, ...

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])


def read_features(features_dir: Path) -> Features:
    """The train and val features and labels that extract wrote to `features_dir`."""
    meta_file = features_dir / "meta.json"
    meta = check_features_meta(meta_file, read_json_file(meta_file))
    arrays = []
    for split in ("train", "val"):
        x, y = (
            read_checked_array(features_dir, f"{split}_{part}.npy", meta)
            for part in ("features", "labels")
        )
        if x.ndim != 2 or x.shape[1] != meta["num_features"] or y.shape != (len(x),):
            raise DataError(
                f"{features_dir}: {split} features {x.shape} and labels {y.shape} do not fit "
                f"{meta['num_features']} features an image; rerun extract (dvc repro -f extract)"
            )
        if not np.isfinite(x).all():
            raise DataError(
                f"{features_dir}: {split} features hold NaN or inf; the backbone's output "
                "overflowed or the file is damaged: rerun extract (dvc repro -f extract)"
            )
        if len(y) and not (0 <= y.min() and y.max() < len(meta["classes"])):
            raise DataError(
                f"{features_dir}: {split} labels outside the {len(meta['classes'])} classes; "
                "rerun extract (dvc repro -f extract)"
            )
        arrays += [x, y]
    return Features(*arrays, meta=meta)


def train_linear(
    features: Features, params: HeadParams, on_epoch: OnEpoch
) -> tuple[nn.Linear, dict]:
    """AdamW + cosine schedule through the one training loop; the best val epoch is kept."""
    head = nn.Linear(features.meta["num_features"], features.num_classes)
    generator = torch.Generator().manual_seed(params.seed)
    train = tensor_batches(
        torch.from_numpy(features.train_x),
        torch.from_numpy(features.train_y),
        params.batch_size,
        shuffle=True,
        generator=generator,
    )
    val = tensor_batches(torch.from_numpy(features.val_x), torch.from_numpy(features.val_y), 1024)
    groups = [
        {"params": list(head.parameters()), "lr": params.lr, "weight_decay": params.weight_decay}
    ]
    result = fit(
        head,
        train,
        val,
        groups,
        epochs=params.epochs,
        patience=params.patience,
        label_smoothing=params.label_smoothing,
        class_weight=balanced_class_weight(
            features.train_y, features.num_classes, params.class_weight
        ),
        select=params.select,
        device=torch.device("cpu"),
        on_epoch=on_epoch,
        desc="head",
        batch_size_key="head.batch_size",
        lr_keys="head.lr",
    )
    summary = {"best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy}
    if params.select != "accuracy":
        summary[f"best_val_{params.select}"] = result.best_val_score
    return head, summary


def train_logreg(
    features: Features, params: HeadParams, on_epoch: OnEpoch
) -> tuple[nn.Linear, dict]:
    """scikit-learn's logistic regression, C chosen on val."""
    return fit_logreg(
        features.train_x,
        features.train_y,
        features.val_x,
        features.val_y,
        features.num_classes,
        params.seed,
        on_epoch,
        class_weight=None if params.class_weight == "none" else "balanced",
        select=params.select,
    )


def fit_logreg(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    num_classes: int,
    seed: int,
    on_candidate: Callable[[dict[str, float]], None] | None = None,
    class_weight: str | None = None,
    select: str = "accuracy",
) -> tuple[nn.Linear, dict[str, float]]:
    """Multinomial logistic regression with C chosen on the validation split by the `select`
    metric (ties: the smaller C), as a nn.Linear.

    Features are standardised for the solver, and the scaling is folded back into the weights
    (W' = W / sigma, b' = b - W' mu), so the returned layer takes raw features like any head.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    scorers = {
        "accuracy": accuracy_score,
        "balanced_accuracy": balanced_accuracy_score,
        "macro_f1": lambda y, p: f1_score(
            y, p, labels=list(range(num_classes)), average="macro", zero_division=0
        ),
    }

    mean = train_x.mean(0)
    std = train_x.std(0) + 1e-6
    scaled_train, scaled_val = (train_x - mean) / std, (val_x - mean) / std
    best = None
    for step, c in enumerate((0.001, 0.01, 0.1, 1.0, 10.0)):
        clf = LogisticRegression(C=c, max_iter=3000, random_state=seed, class_weight=class_weight)
        clf.fit(scaled_train, train_y)
        predicted = clf.predict(scaled_val)
        accuracy = float(accuracy_score(val_y, predicted))
        score = float(scorers[select](val_y, predicted))
        log.info("logreg C=%g: val accuracy %.4f, %s %.4f", c, accuracy, select, score)
        record = {"step": step, "C": c, "val_accuracy": accuracy}
        if on_candidate is not None:
            on_candidate(record | ({} if select == "accuracy" else {f"val_{select}": score}))
        if best is None or score > best[0]:
            best = (score, accuracy, c, clf)
    score, accuracy, c, clf = best
    if len(clf.classes_) != num_classes:
        raise DataError(
            f"train split has {len(clf.classes_)} of {num_classes} classes; rerun prepare"
        )
    weight = clf.coef_ / std  # (C, D)
    bias = clf.intercept_ - weight @ mean
    head = nn.Linear(train_x.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight).float())
        head.bias.copy_(torch.from_numpy(bias).float())
    summary = {"C": c, "best_val_accuracy": accuracy}
    return head, summary | ({} if select == "accuracy" else {f"best_val_{select}": score})


# head.kind -> how that kind is trained.
HEADS: dict[str, Callable[[Features, HeadParams, OnEpoch], tuple[nn.Linear, dict]]] = {
    "linear": train_linear,
    "logreg": train_logreg,
}


def train_head(
    features: Features, params: HeadParams, on_epoch: OnEpoch = None
) -> tuple[nn.Linear, dict]:
    """Train a head of kind `params.kind` on the cached features: (the layer, a summary of the
    fit). Seeds are set here, once; `on_epoch` receives one record per epoch or candidate."""
    seed_everything(params.seed)
    return HEADS[params.kind](features, params, on_epoch)


def head_meta(features: Features, params: HeadParams, summary: dict, environment: dict) -> dict:
    """The head checkpoint's metadata: what finetune and evaluate need to rebuild and check it."""
    from headstart.params import as_dict

    return {
        "kind": "head",
        "in_features": features.meta["num_features"],
        "classes": features.meta["classes"],
        "features_meta": features.meta,
        "params": as_dict(params),
        "summary": summary,
        "environment": environment,
    }
