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
) -> list[Prediction]:
    """Top-k probabilities, softmax(logits / temperature), for every path, in input order;
    failures carry a reason. The temperature (headstart.calibration) never changes the order
    of the classes, only how sure the model says it is. `tta`: the test-time augmentation of
    the logits (inference.TTA), as evaluate.tta applies it."""
    import torch
    from tqdm import tqdm

    from headstart.inference import with_tta
    from headstart.transforms import decode_size, eval_transform, preprocessing

    transform = eval_transform(**preprocessing(meta))
    classes = meta["classes"]
    loader = torch.utils.data.DataLoader(
        _InputDataset(paths, transform, decode_size(meta)),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    results: list[Prediction] = [Prediction(utf8_safe(str(p))) for p in paths]
    model = with_tta(model, tta)
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
        else:
            text = f"ERROR {result.reason}: {printable(result.detail)}"
        lines.append(f"{path:<{width}}  {text}")
    return "\n".join(lines) + "\n"


def format_csv(results: list[Prediction]) -> str:
    rows: list[list[Any]] = []
    for result in results:
        if not result.ok:
            rows.append([result.path, "", "", "", f"{result.reason}: {result.detail}"])
        for rank, (c, p) in enumerate(zip(result.classes, result.probabilities, strict=True), 1):
            rows.append([result.path, rank, c, f"{p:.6f}", ""])
    return csv_text(["path", "rank", "class", "probability", "error"], rows)


def format_json(results: list[Prediction]) -> str:
    return json.dumps([r.as_json() for r in results], indent=2, ensure_ascii=False) + "\n"
