"""Export a fine-tuned Classifier as TorchScript that runs without the headstart package.

The exported module takes a batch already resized to `image_size` x `image_size`, RGB, laid
out (B, 3, S, S), either uint8 in [0, 255] or float in [0, 1] (what torchvision's ToTensor
gives), applies the checkpoint's normalisation inside and returns class probabilities
(B, num_classes). A sidecar JSON says how to get there from an image file: the classes, the
size, mean and std, and the resize (short side, bicubic) + centre crop that training used.

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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from headstart.errors import ArtifactError, UsageError
from headstart.model import Classifier
from headstart.schemas import archive_kind

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


def sidecar(meta: dict[str, Any], temperature: float = 1.0) -> dict[str, Any]:
    """What a user of the TorchScript file needs, as plain JSON."""
    size = int(meta["image_size"])
    return {
        "format": EXPORT_FORMAT,
        "classes": list(meta["classes"]),
        "backbone": meta["backbone"],
        "image_size": size,
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
        "preprocess": [
            "decode to RGB (EXIF orientation applied, transparency composited on white)",
            f"resize the short side to {size} px (bicubic, antialiased)",
            f"centre-crop {size} x {size}",
        ],
        "input": {
            "layout": "NCHW",
            "shape": ["B", 3, size, size],
            "channels": "RGB",
            "dtype": "uint8 in [0, 255] or float32 in [0, 1]",
            "normalisation": "applied inside the model: (x - mean) / std",
        },
        "output": {
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


def to_torchscript(model: Classifier, meta: dict[str, Any], temperature: float = 1.0) -> bytes:
    """Trace the normalised classifier at the checkpoint's image size; return the file bytes."""
    size = int(meta["image_size"])
    inner = NormalisedClassifier(model, meta["mean"], meta["std"], temperature).eval().cpu()
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        # "same" padding computed from the input shape becomes a constant: correct, because
        # the exported model only ever sees image_size x image_size inputs.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # Recent torch marks TorchScript deprecated; it is still the format that loads with
        # nothing but torch (torch.export's files need the same torch version).
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(inner, example)
        scripted = torch.jit.script(AcceptUint8(traced))
        with torch.inference_mode():
            expected = inner(example)
            got = scripted(example)
    if not torch.isfinite(expected).all():
        raise ArtifactError(
            "the model returns non-finite probabilities on a test image: its weights or its "
            "normalisation (mean, std) are broken; rerun finetune"
        )
    difference = (expected - got).abs().max().item()
    if not difference <= 1e-5:  # NaN compares false
        raise ArtifactError(
            f"TorchScript export differs from the model by {difference:.2e}; "
            "this backbone does not trace faithfully"
        )
    log.info("traced %s at %d px; max difference %.1e", meta["backbone"], size, difference)
    log.info('the export applies no test-time augmentation (sidecar: "tta": "none")')
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


def export_torchscript(model_path: Path, temperature: float = 1.0) -> tuple[bytes, dict[str, Any]]:
    """The TorchScript bytes and the sidecar description for the checkpoint at `model_path`
    (what `headstart export` and the export stage write; the caller writes atomically)."""
    from headstart.io import sha256_file
    from headstart.model import load_classifier

    model, meta = load_classifier(model_path)
    data = to_torchscript(model, meta, temperature)
    description = sidecar(meta, temperature)
    description["model_sha256"] = hashlib.sha256(data).hexdigest()
    description["source"] = {"path": str(model_path), "sha256": sha256_file(model_path)}
    return data, description


def export_paths(out: Path, inputs: list[Path]) -> tuple[Path, Path]:
    """(the export, its sidecar beside it) for OUT. Refused with a UsageError: a name whose
    export or sidecar would overwrite one of `inputs` (the checkpoint, its calibration), or a
    checkpoint or calibration file headstart wrote; an earlier export may be replaced."""
    sidecar = out.with_suffix(".json")
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


# headstart export --format: format name -> (checkpoint path, temperature) -> (bytes, sidecar).
EXPORT_FORMATS = {"torchscript": export_torchscript}
