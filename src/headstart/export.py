"""Export a fine-tuned Classifier to files that run without the headstart package.

Every format wraps the model the same way (NormalisedClassifier): a batch already resized and
centre-cropped to `image_size` x `image_size`, RGB, laid out (B, 3, S, S), goes in; the
checkpoint's normalisation is applied inside; class probabilities softmax(logits / T)
(B, num_classes) come out, T being the calibration temperature. A sidecar JSON says how to get
there from an image file: the classes, the size, mean and std, and the resize + centre crop
that predict does. The formats (EXPORT_FORMATS) differ in the file and the runtime: ONNX
(headstart.export_onnx; uint8 input, onnxruntime and every serving stack) and TorchScript
(uint8 or [0, 1] float input, torch.jit.load). `headstart export` and the export stage both
call `export_model`; each format checks its file against the model before it is returned.

Test-time augmentation (evaluate.tta, predict --tta) is not built in: the export scores each
image once, and its sidecar says `"tta": "none"`. For flip TTA, run the batch and its mirror
(`images.flip(3)`) and take softmax of the mean of the two log-probabilities: the logits' mean,
up to a constant per image, so exactly what `headstart predict --tta flip` gives.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from headstart.choices import DEFAULT_EXPORT_FORMAT
from headstart.errors import ArtifactError, UsageError
from headstart.export_onnx import INPUT_NAME, OPSET, OUTPUT_NAME, to_onnx
from headstart.model import Classifier
from headstart.schemas import archive_kind
from headstart.transforms import preprocessing, resize_size

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1


class NormalisedClassifier(nn.Module):
    """float (B, 3, S, S) in [0, 1] -> normalise -> Classifier -> softmax(logits / T).

    T is the calibration temperature (headstart.calibration; 1.0 when uncalibrated).
    """

    def __init__(self, model: Classifier, mean, std, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.temperature = float(temperature)
        # (1, 3, 1, 1) so they broadcast over the batch and the pixels.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model((images - self.mean) / self.std)  # (B, num_classes)
        return torch.softmax(logits / self.temperature, dim=1)


class AcceptUint8(nn.Module):
    """Scripted outer layer: the dtype branch cannot be traced, so it lives here.

    uint8 images are scaled to [0, 1]; float images are taken as already in [0, 1].
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.to(torch.float32) / 255.0
        else:
            images = images.to(torch.float32)
        return self.inner(images)


def sidecar(meta: dict[str, Any], temperature: float, export: ExportFormat) -> dict[str, Any]:
    """What a user of the exported file needs, as plain JSON: the steps from an image file to
    the model's input are predict's (transforms.eval_transform), stated in words and as
    numbers (`resize`, `crop`) that code can read."""
    steps = preprocessing(meta)
    size, short_side = int(steps["size"]), resize_size(steps["size"], steps["crop_pct"])
    return {
        "format": EXPORT_FORMAT,
        "export": export.name,
        "runtime": export.runtime,
        "classes": list(meta["classes"]),
        "backbone": meta["backbone"],
        "image_size": size,
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
        "preprocess": [
            "decode to RGB (EXIF orientation applied, transparency composited on white)",
            f"resize the short side to {short_side} px ({steps['interpolation']}, antialiased; "
            "the long side scaled alike, rounded down)",
            f"centre-crop {size} x {size}",
        ],
        "resize": {
            "short_side": short_side,
            "interpolation": steps["interpolation"],
            "antialias": True,
        },
        "crop": size,
        "input": {
            "name": export.input_name,
            "layout": "NCHW",
            "shape": ["B", 3, size, size],
            "channels": "RGB",
            "dtype": export.input_dtype,
            "normalisation": "applied inside the model: (x - mean) / std",
        },
        "output": {
            "name": export.output_name,
            "shape": ["B", len(meta["classes"])],
            "meaning": "class probabilities, softmax(logits / temperature), in the order of "
            "`classes`",
        },
        # Fitted on the validation split by evaluate (evaluate.calibrate); 1.0: as trained.
        "temperature": float(temperature),
        # Not built in (see the module docstring), whatever evaluate.tta was.
        "tta": "none",
        "tta_note": "test-time augmentation is not applied; for flip, average the "
        "log-probabilities of the batch and of its mirror (flip the width axis), then softmax",
    }


def to_torchscript(inner: NormalisedClassifier, size: int) -> bytes:
    """Trace the normalised classifier at `size` px behind the scripted dtype branch; return
    the file's bytes, checked against the eager model."""
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        # "same" padding computed from the input shape becomes a constant: correct, because
        # the exported model only ever sees image_size x image_size inputs.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # Recent torch marks TorchScript deprecated (see the CHANGELOG: ONNX is the default).
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(inner, example)
        scripted = torch.jit.script(AcceptUint8(traced))
        with torch.inference_mode():
            expected = inner(example)
            got = scripted(example)
    difference = (expected - got).abs().max().item()
    if not difference <= 1e-5:  # NaN compares false
        raise ArtifactError(
            f"TorchScript export differs from the model by {difference:.2e}; "
            "this backbone does not trace faithfully"
        )
    log.info("traced at %d px; max difference %.1e", size, difference)
    # Serialise to memory first, then the caller writes atomically.
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, buffer)
    return strip_debug_info(buffer.getvalue())


def strip_debug_info(data: bytes) -> bytes:
    """The TorchScript archive without its `*.debug_pkl` records.

    Those records map the compiled code back to Python source lines for error messages, and
    name the source files by absolute path (this checkout, the environment's site-packages):
    the same model exported from two folders would differ in bytes, and a DVC output with it.
    torch.jit.load does not need them. The archive's `.data/serialization_id` is computed by
    torch from the CRCs of every record, the debug ones included, so it is recomputed from what
    remains. The archive is rewritten with its records in their order, stored uncompressed with
    a fixed date, so the bytes depend only on the model.
    """
    source = zipfile.ZipFile(io.BytesIO(data))
    kept = [
        (info.filename, source.read(info.filename))
        for info in source.infolist()
        if not info.filename.endswith(".debug_pkl")
    ]
    digest = hashlib.sha256()
    for name, content in kept:
        if not name.endswith("/.data/serialization_id"):
            digest.update(name.encode("utf-8") + b"\0" + content)
    # torch's id is a decimal string (two concatenated 64-bit numbers); 40 digits here too.
    serialization_id = f"{int.from_bytes(digest.digest()[:16], 'big'):040d}".encode("ascii")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as target:
        for name, content in kept:
            if name.endswith("/.data/serialization_id"):
                content = serialization_id
            record = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            record.compress_type = zipfile.ZIP_STORED
            target.writestr(record, content)
    return buffer.getvalue()


def export_model(
    format_name: str, model_path: Path, temperature: float = 1.0
) -> tuple[bytes, dict[str, Any]]:
    """The checked file bytes in `format_name` (EXPORT_FORMATS) and the sidecar description
    for the checkpoint at `model_path` (what `headstart export` and the export stage write;
    the caller writes atomically)."""
    from headstart.io import sha256_file
    from headstart.model import load_classifier

    export = EXPORT_FORMATS[format_name]
    model, meta = load_classifier(model_path)
    size = int(meta["image_size"])
    inner = NormalisedClassifier(model, meta["mean"], meta["std"], temperature).eval().cpu()
    with torch.inference_mode():
        probe = inner(torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)))
    if not torch.isfinite(probe).all():
        raise ArtifactError(
            f"{model_path}: the model returns non-finite probabilities on a test image: its "
            "weights or its normalisation (mean, std) are broken; rerun finetune"
        )
    data = export.build(inner, size)
    log.info("exported %s as %s at %d px", meta["backbone"], format_name, size)
    log.info('the export applies no test-time augmentation (sidecar: "tta": "none")')
    description = sidecar(meta, temperature, export)
    description["model_sha256"] = hashlib.sha256(data).hexdigest()
    description["source"] = {"path": str(model_path), "sha256": sha256_file(model_path)}
    return data, description


def choose_format(out: Path, format_name: str | None) -> str:
    """The format for OUT: `format_name` when given, else the one whose suffix OUT ends with,
    else choices.DEFAULT_EXPORT_FORMAT. A UsageError when OUT's suffix is another format's."""
    by_suffix = [name for name, spec in EXPORT_FORMATS.items() if out.name.endswith(spec.suffix)]
    if format_name is None:
        return by_suffix[0] if by_suffix else DEFAULT_EXPORT_FORMAT
    if by_suffix and format_name not in by_suffix:
        raise UsageError(
            f"{out}: {EXPORT_FORMATS[by_suffix[0]].suffix} is the suffix of {by_suffix[0]} "
            f"files, not {format_name}; name it *{EXPORT_FORMATS[format_name].suffix} or pass "
            f"--format {by_suffix[0]}"
        )
    return format_name


def export_paths(out: Path, inputs: list[Path], format_name: str) -> tuple[Path, Path]:
    """(the export, its sidecar beside it) for OUT in `format_name`. Refused with a UsageError:
    a name whose export or sidecar would overwrite one of `inputs` (the checkpoint, its
    calibration), or a checkpoint or calibration file headstart wrote; an earlier export may be
    replaced."""
    sidecar = EXPORT_FORMATS[format_name].sidecar_path(out)
    if sidecar == out:
        raise UsageError(f"{out}: needs a suffix other than .json (the sidecar's)")
    protected = {os.path.realpath(path): path for path in inputs}
    for target in (out, sidecar):
        real = os.path.realpath(target)
        if real in protected:
            raise UsageError(
                f"{target} would overwrite the input {protected[real]}; choose another output name"
            )
        if _is_checkpoint_or_calibration(Path(real)):
            raise UsageError(
                f"{target} is a headstart checkpoint or calibration file, not an export; "
                "choose another output name"
            )
    return out, sidecar


def _is_checkpoint_or_calibration(path: Path) -> bool:
    """A torch.save archive (not a TorchScript export), or calibration JSON."""
    if archive_kind(path) == "checkpoint":
        return True
    if path.is_file() and path.suffix == ".json" and path.stat().st_size < 1 << 20:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return False
        return isinstance(record, dict) and {"format", "temperature", "model"} <= set(record)
    return False


@dataclass(frozen=True)
class ExportFormat:
    """One way out of the pipeline: how the file is built and checked, how it is named, what
    it takes and what runs it."""

    name: str
    # (NormalisedClassifier, image size) -> the file's bytes, checked against the model.
    build: Callable[[nn.Module, int], bytes]
    suffix: str  # what OUT ends with; `headstart export` infers the format from it
    sidecar_path: Callable[[Path], Path]  # OUT -> its sidecar JSON
    input_dtype: str
    runtime: str
    input_name: str | None = None  # the graph's input and output names, where they matter
    output_name: str | None = None


# headstart export --format and the export stage (which picks by its output's suffix).
EXPORT_FORMATS: dict[str, ExportFormat] = {
    "onnx": ExportFormat(
        "onnx",
        to_onnx,
        ".onnx",
        lambda out: out.with_name(out.name + ".json"),  # model.onnx -> model.onnx.json
        "uint8 in [0, 255]",
        f"onnxruntime (or another ONNX runtime; opset {OPSET})",
        INPUT_NAME,
        OUTPUT_NAME,
    ),
    "torchscript": ExportFormat(
        "torchscript",
        to_torchscript,
        ".pt",
        lambda out: out.with_suffix(".json"),  # model.ts.pt -> model.ts.json, as before ONNX
        "uint8 in [0, 255] or float32 in [0, 1]",
        "torch.jit.load",
    ),
}
