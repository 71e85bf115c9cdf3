"""Prediction on new image files: preprocessing from the checkpoint's metadata, images decoded
by the same function as in training, so predictions match what evaluate measured. A file that
cannot be used is reported with its reason and the rest are still predicted.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headstart.folders import is_hidden

log = logging.getLogger(__name__)

# Below this many inputs a progress bar is noise.
PROGRESS_MIN_FILES = 16


@dataclass
class Prediction:
    path: str
    classes: list[str] = field(default_factory=list)  # best first
    probabilities: list[float] = field(default_factory=list)
    reason: str | None = None  # an UnusableImage reason code (or not_found) when it failed
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
        if not path.is_file():
            return index, None, "not_found", "no such file"
        try:
            image = decode_image(path, self.decode_size).image
        except UnusableImage as error:
            return index, None, error.reason, error.detail
        return index, self.transform(image), None, ""


def _collate(items):
    return items  # images stacked in predict_files, after the failed ones are set aside


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
) -> list[Prediction]:
    """Top-k probabilities, softmax(logits / temperature), for every path, in input order;
    failures carry a reason. The temperature (headstart.calibration) never changes the order
    of the classes, only how sure the model says it is."""
    import torch
    from tqdm import tqdm

    from headstart.transforms import eval_transform

    transform = eval_transform(meta["image_size"], meta["mean"], meta["std"])
    classes = meta["classes"]
    loader = torch.utils.data.DataLoader(
        _InputDataset(paths, transform, meta["image_size"]),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    results: list[Prediction] = [Prediction(str(p)) for p in paths]
    model.eval().to(device, memory_format=torch.channels_last)  # as evaluate runs it
    progress = tqdm(
        total=len(paths),
        desc="predict",
        unit="img",
        file=sys.stderr,
        disable=True if len(paths) < PROGRESS_MIN_FILES else None,  # None: only on a terminal
    )
    with torch.inference_mode(), progress:
        for items in loader:
            good = []
            for index, image, reason, detail in items:
                if image is None:
                    results[index].reason, results[index].detail = reason, detail
                else:
                    good.append((index, image))
            if good:
                images = torch.stack([image for _, image in good])  # (B, 3, S, S)
                images = images.to(device, memory_format=torch.channels_last)
                logits = model(images).float()  # (B, num_classes)
                probabilities = torch.softmax(logits / temperature, dim=1).cpu()
                top = probabilities.topk(min(top_k, len(classes)), dim=1)  # sorted, best first
                for row, (index, _) in enumerate(good):
                    results[index].classes = [classes[i] for i in top.indices[row].tolist()]
                    results[index].probabilities = top.values[row].tolist()
            progress.update(len(items))
    # Logged after the loop so the messages do not tear the progress bar.
    for result in results:
        if not result.ok:
            log.warning("%s: %s: %s", result.path, result.reason, result.detail)
    return results


def format_table(results: list[Prediction]) -> str:
    width = max((len(r.path) for r in results), default=4)
    lines = [f"{'path':<{width}}  predictions"]
    for result in results:
        if result.ok:
            text = "  ".join(
                f"{c} ({p:.3f})" for c, p in zip(result.classes, result.probabilities, strict=True)
            )
        else:
            text = f"ERROR {result.reason}: {result.detail}"
        lines.append(f"{result.path:<{width}}  {text}")
    return "\n".join(lines) + "\n"


def format_csv(results: list[Prediction]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "rank", "class", "probability", "error"])
    for result in results:
        if not result.ok:
            writer.writerow([result.path, "", "", "", f"{result.reason}: {result.detail}"])
        for rank, (c, p) in enumerate(zip(result.classes, result.probabilities, strict=True), 1):
            writer.writerow([result.path, rank, c, f"{p:.6f}", ""])
    return buffer.getvalue()


def format_json(results: list[Prediction]) -> str:
    return json.dumps([r.as_json() for r in results], indent=2, ensure_ascii=False) + "\n"
