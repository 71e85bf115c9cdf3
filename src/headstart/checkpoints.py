"""Checkpoints: tensors plus the plain-data metadata needed to rebuild the model, never
pickled code, and the sha256 of their own content, checked on every load.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

from headstart.errors import ArtifactError, MissingFileError
from headstart.io import printable, write_bytes

# 2: the checkpoint records the sha256 of its own content (checkpoint_digest), checked on load.
CHECKPOINT_FORMAT = 2


# torch.save writes every record of a checkpoint's zip stored, not compressed, so a record can
# never inflate beyond the file's own size. A compressed record (or one whose stated size differs
# from its stored size) is not ours, and could decompress to gigabytes inside torch.load: refused.
CHECKPOINT_RECORD_COMPRESSION = zipfile.ZIP_STORED


def save_checkpoint(path: Path, state_dict: dict, meta: dict[str, Any]) -> None:
    """Save tensors plus the plain-data metadata needed to rebuild the model. No pickled code."""
    import torch  # here, not at the top: stages that only read and write files skip torch

    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    content = {"format": CHECKPOINT_FORMAT, "state_dict": state, "meta": meta}
    content["sha256"] = checkpoint_digest(state, meta)
    # Serialise to memory first: torch.save names the zip's root folder after the file it
    # writes to, and the temporary file's random name would make every save differ in bytes.
    buffer = io.BytesIO()
    torch.save(content, buffer)
    write_bytes(path, buffer.getvalue())


def checkpoint_digest(state: dict, meta: dict[str, Any]) -> str:
    """sha256 over a checkpoint's tensors (name, dtype, shape, bytes, in name order) and its
    metadata (as sorted JSON): what load_checkpoint recomputes, since DVC trusts its cache and
    a byte changed there would otherwise be loaded without a word."""
    import torch

    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode("utf-8"))
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint(path: Path) -> tuple[dict, dict[str, Any]]:
    """Load a checkpoint written by save_checkpoint, never executing code from the file."""
    import torch

    if not Path(path).is_file():
        raise MissingFileError(f"{path}: checkpoint not found; run the stage that writes it")
    if Path(path).stat().st_size == 0:
        raise ArtifactError(
            f"{path}: empty file (0 bytes): not a headstart checkpoint; rerun the stage that "
            "writes it"
        )
    _check_records(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ArtifactError(f"{path}: not a loadable headstart checkpoint: {error}") from error
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        older = isinstance(data, dict) and data.get("format") == 1
        raise ArtifactError(
            f"{path}: not a headstart checkpoint (format {CHECKPOINT_FORMAT})"
            + ("; it was written by an older headstart: rerun the stage" if older else "")
        )
    state, meta = data.get("state_dict"), data.get("meta")
    if not (isinstance(state, dict) and isinstance(meta, dict)):
        raise ArtifactError(f"{path}: a headstart checkpoint holds a state dict and metadata")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"{path}: state_dict must map parameter names to tensors")
    if data.get("sha256") != checkpoint_digest(state, meta):
        raise ArtifactError(
            f"{path}: corrupt (its content does not match the sha256 recorded in it); restore "
            f"it with `dvc checkout --relink {path}` or `dvc pull`, or rerun the stage that "
            "writes it with `dvc repro -f <stage>`"
        )
    return state, meta


def _check_records(path: Path) -> None:
    """Refuse a checkpoint zip with a record torch.save never writes (compressed, or stated
    larger than it is stored): torch.load would inflate it, without bound, before any check.
    A file that is not a zip is left to torch.load, which says what is wrong with it."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return
    for record in records:
        if (
            record.compress_type != CHECKPOINT_RECORD_COMPRESSION
            or record.file_size != record.compress_size
        ):
            raise ArtifactError(
                f"{path}: record {printable(record.filename)!r} is compressed or sized unlike "
                f"torch.save writes it ({record.compress_size} bytes stored, {record.file_size} "
                "when read); headstart checkpoints store every record uncompressed, so this file "
                "was not written by headstart and is not loaded: rerun the stage that writes it"
            )
