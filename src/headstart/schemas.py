"""What each file headstart reads back must hold, checked before any work: a damaged, foreign or
hand-edited file is refused with the file and the field named (ArtifactError), never a
KeyError, a TypeError or absurd work later (an image size of 20000, a zero std).

One check per file kind: classifier and head checkpoints (their metadata and their tensors),
calibration files, and the features' meta.json.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from headstart.errors import ArtifactError, MissingFileError

# As backbone.image_size allows; larger inputs are refused before anything is allocated.
IMAGE_SIZE_RANGE = (32, 1024)
# The resize interpolations a model's metadata may name (torchvision's InterpolationMode values).
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


def _fail(path: Path, field: str, problem: str) -> None:
    raise ArtifactError(f"{path}: {field} {problem}; rerun the stage that wrote it")


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _finite_numbers(value: Any, count: int) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == count
        and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in value
        )
    )


def _check_mapping(path: Path, value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        _fail(path, what, f"is {type(value).__name__}, not a mapping")
    return value


def _check_classes(path: Path, classes: Any, field: str = "classes") -> None:
    if not (
        isinstance(classes, list)
        and len(classes) >= 2
        and all(isinstance(c, str) and c for c in classes)
        and len(set(classes)) == len(classes)
    ):
        _fail(path, field, "must be a list of at least two distinct class names")


def _check_preprocessing(path: Path, meta: dict, prefix: str = "") -> None:
    """image_size, mean and std: what every prediction's preprocessing is built from."""
    if not _int_in(meta.get("image_size"), *IMAGE_SIZE_RANGE):
        _fail(path, f"{prefix}image_size", f"must be whole pixels in {list(IMAGE_SIZE_RANGE)}")
    if not _finite_numbers(meta.get("mean"), 3):
        _fail(path, f"{prefix}mean", "must be 3 finite numbers (one per RGB channel)")
    std = meta.get("std")
    if not (_finite_numbers(std, 3) and all(s > 0 for s in std)):
        _fail(path, f"{prefix}std", "must be 3 finite numbers above 0 (one per RGB channel)")
    # Optional: files written before timm backbones resized bicubic and kept the whole side.
    if meta.get("interpolation", "bicubic") not in INTERPOLATIONS:
        _fail(path, f"{prefix}interpolation", f"must be one of {', '.join(INTERPOLATIONS)}")
    crop = meta.get("crop_pct", 1.0)
    if not (_finite_numbers([crop], 1) and 0.5 <= crop <= 1.0):
        _fail(path, f"{prefix}crop_pct", "must be a number in [0.5, 1]")


def _check_kind(path: Path, meta: dict, kind: str, fix: str) -> None:
    if meta.get("kind") != kind:
        raise ArtifactError(f"{path}: not a {kind} checkpoint (kind {meta.get('kind')!r}); {fix}")


def archive_kind(path: Path) -> str | None:
    """What a torch zip archive holds, from its record names alone (nothing is unpickled):
    "torchscript" (compiled code/ records: an export), "checkpoint" (torch.save's data.pkl
    only), or None (not a zip archive)."""
    if not (Path(path).is_file() and zipfile.is_zipfile(path)):
        return None
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any("/code/" in name for name in names):
        return "torchscript"
    return "checkpoint" if any(name.endswith("/data.pkl") for name in names) else None


def check_classifier_meta(path: Path, meta: Any) -> dict:
    """A fine-tuned classifier's metadata (finetune's checkpoint)."""
    from headstart.backbone_specs import BACKBONES, TIMM_PREFIX

    meta = _check_mapping(path, meta, "metadata")
    _check_kind(path, meta, "classifier", "pass the fine-tuned model, e.g. models/finetuned.pt")
    backbone = meta.get("backbone")
    if not (
        backbone in BACKBONES or (isinstance(backbone, str) and backbone.startswith(TIMM_PREFIX))
    ):
        _fail(path, "backbone", f"must be one of {', '.join(BACKBONES)} or timm:<model>")
    if not _int_in(meta.get("num_features"), 1, 1 << 20):
        _fail(path, "num_features", "must be a positive whole number")
    _check_classes(path, meta.get("classes"))
    _check_preprocessing(path, meta)
    return meta


def check_head_meta(path: Path, meta: Any) -> dict:
    """A head's metadata (train_head's checkpoint), with the features' metadata it carries."""
    meta = _check_mapping(path, meta, "metadata")
    _check_kind(path, meta, "head", "pass the head, e.g. models/head.pt")
    if not _int_in(meta.get("in_features"), 1, 1 << 20):
        _fail(path, "in_features", "must be a positive whole number")
    _check_classes(path, meta.get("classes"))
    features = _check_mapping(path, meta.get("features_meta"), "features_meta")
    _check_preprocessing(path, features, "features_meta.")
    if features.get("num_features") != meta["in_features"]:
        _fail(path, "features_meta.num_features", "differs from in_features")
    return meta


def check_features_meta(path: Path, meta: Any) -> dict:
    """extract's meta.json: what the cached features are and what they were made with."""
    meta = _check_mapping(path, meta, "contents")
    if not _int_in(meta.get("num_features"), 1, 1 << 20):
        _fail(path, "num_features", "must be a positive whole number")
    _check_classes(path, meta.get("classes"))
    _check_preprocessing(path, meta)
    return meta


def read_checked_array(folder: Path, name: str, meta: dict) -> Any:
    """folder/name, after checking its sha256 against the one extract recorded in meta.json."""
    from headstart.io import read_array, sha256_file

    path = folder / name
    expected = meta.get("files", {}).get(name) if isinstance(meta.get("files"), dict) else None
    if expected is None:
        raise ArtifactError(
            f"{folder / 'meta.json'}: records no sha256 for {name} (features from an older "
            "headstart?); rerun extract (dvc repro -f extract)"
        )
    if sha256_file(path) != expected:
        raise ArtifactError(
            f"{path}: corrupt (its sha256 is not the one extract recorded); restore it with "
            f"`dvc checkout --relink {folder}` or `dvc pull`, or rerun `dvc repro -f extract`"
        )
    return read_array(path)


def load_weights(
    path: Path,
    module: nn.Module,
    state: Any,
    architecture: str = "the architecture in its metadata",
) -> None:
    """Load a file's tensors into the module `architecture` names; tensors of other names or
    shapes (another architecture, another class count) are refused, naming the file."""
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        _fail(path, "state_dict", "must map parameter names to tensors")
    try:
        module.load_state_dict(state)
    except RuntimeError as error:  # missing or unexpected keys, size mismatch
        detail = str(error).strip().splitlines()
        summary = " ".join(line.strip() for line in detail[1:3]) or detail[0]
        raise ArtifactError(
            f"{path}: its tensors do not fit {architecture} ({summary[:300]}); use weights made "
            "for it, or rerun the stage that wrote the file"
        ) from error


def read_json_file(path: Path) -> Any:
    """A JSON file headstart wrote; a missing, non-UTF-8 or malformed one is refused by name."""
    from headstart.io import read_json

    if not Path(path).is_file():
        raise MissingFileError(f"{path}: not found; rerun the stage that writes it")
    try:
        return read_json(path)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        message = f"{path}: not valid JSON ({error}); rerun the stage that wrote it"
        raise ArtifactError(message) from error


def check_calibration_record(path: Path, record: Any, format_version: int) -> dict:
    """evaluate's calibration file: which model it belongs to and its temperature."""
    record = _check_mapping(path, record, "contents")
    if record.get("format") != format_version:
        raise ArtifactError(f"{path}: not a headstart calibration file (format {format_version})")
    model = record.get("model")
    if not (isinstance(model, dict) and isinstance(model.get("sha256"), str)):
        _fail(path, "model.sha256", "must name the model file's sha256")
    temperature = record.get("temperature")
    if not (isinstance(temperature, int | float) and not isinstance(temperature, bool)):
        _fail(path, "temperature", "must be a number")
    if not (math.isfinite(temperature) and temperature > 0):
        _fail(path, "temperature", f"must be finite and above 0, got {temperature}")
    return record
