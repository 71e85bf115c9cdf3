"""Prediction on new image files: preprocessing from the checkpoint's metadata, images decoded
by the same function as in training, so predictions match what evaluate measured. A file that
cannot be used is reported with its reason and the rest are still predicted.

The table and the warnings show names with control characters escaped (io.printable); CSV and
JSON keep the true values (CSV through io.csv_text, so any name reads back). A name that is not
valid UTF-8 cannot be written to either: such a file is reported (unencodable_name), not
predicted.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headstart.folders import is_hidden
from headstart.io import csv_text, is_utf8, printable, utf8_safe

log = logging.getLogger(__name__)

# Below this many inputs a progress bar is noise.
PROGRESS_MIN_FILES = 16


@dataclass
class Prediction:
    path: str
    classes: list[str] = field(default_factory=list)  # best first
    probabilities: list[float] = field(default_factory=list)
    # The unfamiliar-image guard's verdict and score (headstart.familiarity); None without one.
    familiar: bool | None = None
    distance: float | None = None
    # An UnusableImage reason code (or not_found, unencodable_name) when it failed.
    reason: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "predictions": [
                {"class": c, "probability": p}
                for c, p in zip(self.classes, self.probabilities, strict=True)
            ],
            "familiar": self.familiar,
            "distance": self.distance,
            "error": None if self.ok else {"reason": self.reason, "detail": self.detail},
        }


def list_inputs(arguments: list[Path]) -> list[Path]:
    """Files as given; folders walked recursively in sorted order, hidden files skipped."""
    paths: list[Path] = []
    for argument in arguments:
        if not argument.is_dir():
            paths.append(argument)  # a missing file is reported as not_found, per file
            continue
        for dirpath, dirnames, filenames in os.walk(argument):
            dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
            paths.extend(Path(dirpath) / name for name in sorted(filenames) if not is_hidden(name))
    return paths


class _InputDataset:
    """Item i: (i, image tensor or None, reason, detail); decoding errors are data, not raised."""

    def __init__(self, paths: list[Path], transform, decode_size: int):
        self.paths = paths
        self.transform = transform
        self.decode_size = decode_size  # as in training: see loaders.ImageDataset

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from headstart.images import UnusableImage, decode_image

        path = self.paths[index]
        if not is_utf8(str(path)):
            return index, None, "unencodable_name", "file name is not valid UTF-8; rename it"
        if not path.exists():
            return index, None, "not_found", "no such file"
        try:  # a FIFO, socket or device is refused there (not_regular), never opened
            image = decode_image(path, self.decode_size).image
        except UnusableImage as error:
            return index, None, error.reason, utf8_safe(error.detail)
        return index, self.transform(image), None, ""


def _collate(items):
    return items  # images stacked in predict_files, after the failed ones are set aside


class Predictor:
    """A loaded model ready to score preprocessed image batches: what `headstart predict` and
    `headstart serve` share. Probabilities are softmax(logits / temperature): the temperature
    (headstart.calibration) never changes the order of the classes, only how sure the model
    says it is. `tta`: the test-time augmentation of the logits (inference.TTA), as
    evaluate.tta applies it. `guard`: the unfamiliar-image guard (headstart.familiarity), or
    None."""

    def __init__(
        self, model, meta: dict[str, Any], *, device, temperature=1.0, tta="none", guard=None
    ):
        import torch

        from headstart.familiarity import LogitsAndFeatures
        from headstart.transforms import decode_size, eval_transform, preprocessing

        self.classes = list(meta["classes"])
        self.transform = eval_transform(**preprocessing(meta))
        self.decode_size = decode_size(meta)  # as in training: see loaders.ImageDataset
        self.device = device
        self.temperature = temperature
        self.guard = guard
        self.model = LogitsAndFeatures(model, tta).eval()
        self.model.to(device, memory_format=torch.channels_last)  # as evaluate runs it

    def score(self, images, results: list[Prediction], top_k: int) -> None:
        """Fill `results` (one per image) from the (B, 3, S, S) batch `images`."""
        import torch

        from headstart.familiarity import split_outputs

        with torch.inference_mode():
            images = images.to(self.device, memory_format=torch.channels_last)
            outputs = self.model(images).float().cpu()  # (B, num_classes + D)
        logits, features = split_outputs(outputs, len(self.classes))
        probabilities = torch.softmax(logits / self.temperature, dim=1)
        top = probabilities.topk(min(top_k, len(self.classes)), dim=1)  # sorted, best first
        if self.guard is not None:
            distances = self.guard.scores(features.numpy())
            familiar = self.guard.familiar(distances)
        for row, result in enumerate(results):
            result.classes = [self.classes[i] for i in top.indices[row].tolist()]
            result.probabilities = top.values[row].tolist()
            if self.guard is not None:
                result.familiar = bool(familiar[row])
                result.distance = round(float(distances[row]), 6)


def predict_files(
    model,
    meta: dict[str, Any],
    paths: list[Path],
    *,
    top_k: int,
    batch_size: int,
    device,
    num_workers: int = 0,
    temperature: float = 1.0,
    tta: str = "none",
    guard=None,
) -> list[Prediction]:
    """Top-k probabilities for every path, in input order (see Predictor); failures carry a
    reason."""
    import torch
    from tqdm import tqdm

    predictor = Predictor(model, meta, device=device, temperature=temperature, tta=tta, guard=guard)
    loader = torch.utils.data.DataLoader(
        _InputDataset(paths, predictor.transform, predictor.decode_size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    results: list[Prediction] = [Prediction(utf8_safe(str(p))) for p in paths]
    progress = tqdm(
        total=len(paths),
        desc="predict",
        unit="img",
        file=sys.stderr,
        disable=True if len(paths) < PROGRESS_MIN_FILES else None,  # None: only on a terminal
    )
    with progress:
        for items in loader:
            good = []
            for index, image, reason, detail in items:
                if image is None:
                    results[index].reason, results[index].detail = reason, detail
                else:
                    good.append((index, image))
            if good:
                images = torch.stack([image for _, image in good])  # (B, 3, S, S)
                predictor.score(images, [results[index] for index, _ in good], top_k)
            progress.update(len(items))
    # Logged after the loop so the messages do not tear the progress bar.
    for result in results:
        if not result.ok:
            log.warning(
                "%s: %s: %s", printable(result.path), result.reason, printable(result.detail)
            )
    return results


def format_table(results: list[Prediction]) -> str:
    """For a person on a terminal: paths, classes and messages with control characters
    escaped (io.printable)."""
    paths = [printable(r.path) for r in results]
    width = max((len(p) for p in paths), default=4)
    lines = [f"{'path':<{width}}  predictions"]
    for path, result in zip(paths, results, strict=True):
        if result.ok:
            text = "  ".join(
                f"{printable(c)} ({p:.3f})"
                for c, p in zip(result.classes, result.probabilities, strict=True)
            )
            if result.familiar is False:
                text += f"  UNFAMILIAR (distance {result.distance:.4f})"
        else:
            text = f"ERROR {result.reason}: {printable(result.detail)}"
        lines.append(f"{path:<{width}}  {text}")
    return "\n".join(lines) + "\n"


def format_csv(results: list[Prediction]) -> str:
    """One row per image and rank; `familiar` (true/false) and `distance` are the guard's,
    empty without one."""
    rows: list[list[Any]] = []
    for result in results:
        if not result.ok:
            rows.append([result.path, "", "", "", "", "", f"{result.reason}: {result.detail}"])
        familiar = "" if result.familiar is None else str(result.familiar).lower()
        distance = "" if result.distance is None else f"{result.distance:.6f}"
        for rank, (c, p) in enumerate(zip(result.classes, result.probabilities, strict=True), 1):
            rows.append([result.path, rank, c, f"{p:.6f}", familiar, distance, ""])
    header = ["path", "rank", "class", "probability", "familiar", "distance", "error"]
    return csv_text(header, rows)


def format_json(results: list[Prediction]) -> str:
    return json.dumps([r.as_json() for r in results], indent=2, ensure_ascii=False) + "\n"
