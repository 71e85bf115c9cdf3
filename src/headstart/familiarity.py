"""The unfamiliar-image guard: do an image's features look like the training images'?

A classifier gives every input one of its classes, confidently or not: a screenshot fed to a
digit model comes back as a digit. The guard scores how far an image's features (the
fine-tuned backbone's pooled features, the head's input) are from the training images': the
mean Euclidean distance between unit-length features to its k nearest train images, the deep
nearest-neighbour score of Sun et al. (2022) and the audit's outlier score, here in the
fine-tuned model's own features. The threshold is the validation images' score quantile that
flags `evaluate.guard_flag_rate` of them: an image scoring above it is `familiar: false`.

evaluate writes the reference features and the threshold beside the model
(`<model>.guard.safetensors`, tied to the model file by its sha256, like the calibration);
`headstart predict` and `headstart serve` read it. It works the same for every backbone
family: it needs only the pooled features every Classifier has.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from headstart.errors import ArtifactError, DataError
from headstart.io import sha256_file
from headstart.neighbours import nearest_distances, normalised

GUARD_FORMAT = 1
# The seed of the sample of train images kept as the reference when there are more than
# evaluate.guard_reference: the file and the lookups stay small (10,000 x 1280 float16 is
# 24 MiB).
REFERENCE_SEED = 0
# Images in each generated foreign set evaluate measures the guard on.
FOREIGN_COUNT = 48


class LogitsAndFeatures(nn.Module):
    """A Classifier's logits and pooled features in one pass: (B, num_classes + D). With flip
    TTA the logits are the mean over the image and its mirror, as inference.FlipTTA gives
    them, and the features are the image's own."""

    def __init__(self, model: nn.Module, tta: str = "none"):
        super().__init__()
        self.model = model
        self.flip = tta == "flip"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.backbone(images)
        logits = self.model.head(features)
        if self.flip:
            logits = (logits + self.model(images.flip(3))) / 2
        return torch.cat([logits, features], dim=1)


def split_outputs(outputs: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """LogitsAndFeatures' rows -> (logits, features)."""
    return outputs[:, :num_classes], outputs[:, num_classes:]


@dataclass(frozen=True)
class Guard:
    reference: np.ndarray  # (R, D) float16, unit-length train features
    neighbours: int
    threshold: float
    flag_rate: float  # the share of val images above the threshold, as asked

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N,) mean distance to the k nearest reference features; larger is less familiar."""
        if features.ndim != 2 or features.shape[1] != self.reference.shape[1]:
            raise ArtifactError(
                f"the guard holds {self.reference.shape[1]}-wide features, the model gives "
                f"{features.shape[1:]}: rerun evaluate (dvc repro)"
            )
        return nearest_distances(normalised(features), self.unit, self.neighbours).mean(1)

    @cached_property
    def unit(self) -> np.ndarray:
        """The reference as float32 rows of exactly unit length (float16 storage rounds)."""
        return normalised(self.reference.astype(np.float32))

    def familiar(self, scores: np.ndarray) -> np.ndarray:
        return scores <= self.threshold


def reference_sample(count: int, max_reference: int) -> np.ndarray:
    """Positions of the train images kept as the reference: all of them, or a seeded sample
    of `max_reference`, in index order."""
    if count <= max_reference:
        return np.arange(count)
    return np.sort(np.random.default_rng(REFERENCE_SEED).permutation(count)[:max_reference])


def build_guard(
    train_features: np.ndarray, val_features: np.ndarray, neighbours: int, flag_rate: float
) -> Guard:
    """The guard from the reference train images' features and the val images', whose scores
    set the threshold."""
    if not len(train_features) or not len(val_features):
        raise DataError(
            "data/prepared: the unfamiliar-image guard needs train and val images; "
            "give each split at least one image (data.val_fraction)"
        )
    reference = normalised(train_features).astype(np.float16)
    unthresholded = Guard(reference, min(neighbours, len(reference)), np.inf, flag_rate)
    scores = unthresholded.scores(val_features)
    # "higher": the threshold is a val image's own score, so at most flag_rate lie above it.
    threshold = float(np.quantile(scores, 1.0 - flag_rate, method="higher"))
    return Guard(reference, unthresholded.neighbours, threshold, flag_rate)


def guard_path(model_path: Path) -> Path:
    """models/finetuned.pt -> models/finetuned.guard.safetensors: where its guard lives."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.guard.safetensors")


def guard_bytes(guard: Guard, model_path: Path) -> bytes:
    """The guard file: the reference in safetensors (loads without executing code), the rest
    in its metadata as one JSON string (one key, so the bytes do not depend on key order)."""
    from safetensors.numpy import save

    record = {
        "format": GUARD_FORMAT,
        "neighbours": guard.neighbours,
        "threshold": guard.threshold,
        "flag_rate": guard.flag_rate,
        "model": {"path": Path(model_path).name, "sha256": sha256_file(model_path)},
    }
    return save({"reference": np.ascontiguousarray(guard.reference)}, {"guard": json.dumps(record)})


def read_guard(path: Path, model_path: Path) -> Guard:
    """The guard in `path`, checked to belong to `model_path`."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        data = path.read_bytes()
        record = _record(data)
        reference = load(data)["reference"]
        guard = Guard(
            reference, int(record["neighbours"]), float(record["threshold"]), record["flag_rate"]
        )
        expected = record["model"]["sha256"]
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as error:
        raise ArtifactError(
            f"{path}: not a readable guard file ({type(error).__name__}: {error}); rerun "
            "evaluate (dvc repro) or pass --guard none"
        ) from error
    if record.get("format") != GUARD_FORMAT:
        raise ArtifactError(f"{path}: guard format {record.get('format')}, expected 1")
    if expected != sha256_file(model_path):
        raise ArtifactError(
            f"{path}: was built for another version of {model_path}; rerun evaluate "
            "(dvc repro) or pass --guard none"
        )
    return guard


def _record(data: bytes) -> dict[str, Any]:
    """The metadata JSON of a safetensors file: an 8-byte little-endian header length, then
    the header."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    return json.loads(header["__metadata__"]["guard"])


def summary(guard: Guard, val_scores: np.ndarray, test_scores: np.ndarray) -> dict[str, Any]:
    """What evaluate reports: the threshold and the shares of val and test flagged."""
    return {
        "neighbours": guard.neighbours,
        "threshold": round(guard.threshold, 6),
        "val_flagged": round(float((~guard.familiar(val_scores)).mean()), 6),
        "test_flagged": round(float((~guard.familiar(test_scores)).mean()), 6),
    }


def _noise(size: int, rng: np.random.Generator) -> Iterable[Image.Image]:
    for _ in range(FOREIGN_COUNT):
        yield Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _blank(size: int, rng: np.random.Generator) -> Iterable[Image.Image]:
    colours = [(0, 0, 0), (255, 255, 255), (128, 128, 128)]
    colours += [tuple(c) for c in rng.integers(0, 256, (FOREIGN_COUNT - 3, 3)).tolist()]
    for colour in colours:
        yield Image.new("RGB", (size, size), colour)


# scikit-image's bundled colour photos (no download): "images of another dataset".
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry")


def _photos(size: int, rng: np.random.Generator) -> Iterable[Image.Image]:
    import skimage.data

    photos = [getattr(skimage.data, name)()[..., :3] for name in PHOTOS]
    for n in range(FOREIGN_COUNT):
        photo = photos[n % len(photos)]
        side = int(rng.uniform(0.3, 1.0) * min(photo.shape[:2]))
        y = int(rng.integers(0, photo.shape[0] - side + 1))
        x = int(rng.integers(0, photo.shape[1] - side + 1))
        yield Image.fromarray(np.ascontiguousarray(photo[y : y + side, x : x + side]))


# evaluate.guard_foreign: name -> (image size, generator) -> RGB images nothing trained on.
FOREIGN = {"noise": _noise, "blank": _blank, "photos": _photos}


def foreign_images(name: str, size: int) -> list[Image.Image]:
    """The foreign set `name` (FOREIGN), generated from a fixed seed: the same every run."""
    rng = np.random.default_rng([list(FOREIGN).index(name), 0])
    return list(FOREIGN[name](size, rng))
