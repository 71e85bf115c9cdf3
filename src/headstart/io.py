"""Files: atomic writes, JSON, feature arrays and self-describing checkpoints.

Every output goes to a temporary file in its destination folder and is moved into place with
`os.replace`, so an interrupted stage never leaves a half-written file behind. A process killed
outright (SIGKILL, power loss) cannot clean up its temporary file; the next write to the same
path removes such orphans. A full disk raises `DiskFullError` naming the file, and the previous
version of the file stays as it was.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from headstart.errors import DISK_FULL_ERRNOS, ArtifactError, DiskFullError, MissingFileError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def _disk_full(path: Path, error: OSError) -> DiskFullError:
    reason = os.strerror(error.errno).lower()
    return DiskFullError(
        error.errno,
        f"{reason}; free disk space and run again (any previous version is unchanged)",
        str(path),
    )


def _umask() -> int:
    """The process umask (reading it means setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_orphans(path: Path) -> list[Path]:
    """Remove temporary files and folders that a killed write to `path` left next to it.

    They are named like the ones atomic_path and atomic_dir make: `.<name>.<random>.tmp`, where
    the random part (tempfile's) has no dots, so `.a.b.<random>.tmp` (a temp file of `a.b`)
    is never taken for one of `a`'s. One writer per output path is assumed, as in a pipeline.
    """
    pattern = re.compile(re.escape(_temp_prefix(path)) + r"[a-z0-9_]+\.tmp")
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
        removed.append(Path(entry.path))
    if removed:
        log.warning(
            "removed %d temporary file(s) left by an interrupted write of %s: %s",
            len(removed),
            path,
            ", ".join(p.name for p in removed),
        )
    return removed


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and move it into place.

    On any error (a full disk included) the temporary file is removed and `path` keeps its
    previous content; ENOSPC/EDQUOT become a DiskFullError that names `path`.
    """
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(path)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get normal modes
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except OSError as error:
        if error.errno in DISK_FULL_ERRNOS and not isinstance(error, DiskFullError):
            raise _disk_full(path, error) from error
        raise
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


class ArrayWriter:
    """A new .npy file of known shape, written batch by batch with plain writes: memory stays
    one batch (no mapped pages either) however many rows. Same bytes as write_array of the
    whole array. Not atomic: use it inside atomic_dir.

        with ArrayWriter(path, (rows, width), np.float32) as out:
            for batch in batches:
                out.write(batch)
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype):
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        self.rows = 0
        self._handle = open(path, "wb")
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": self.shape,
        }
        np.lib.format.write_array_header_1_0(self._handle, header)  # as np.save writes it

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
            raise ValueError(f"{self.path}: rows of shape {rows.shape} do not fit {self.shape}")
        self._handle.write(rows.tobytes())
        self.rows += len(rows)

    def __enter__(self) -> ArrayWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._handle.close()
        if kind is None and self.rows != self.shape[0]:
            raise ValueError(f"{self.path}: {self.rows} rows written, {self.shape[0]} expected")


def open_array(path: Path, shape: tuple[int, ...], dtype) -> np.memmap:
    """A new .npy file of `shape`, memory-mapped to be filled in place and read back (cached
    activations): anonymous memory stays one batch whatever the number of rows. Same bytes as
    write_array of the filled array. Not atomic."""
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def read_array(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(path: Path, state_dict: dict, meta: dict[str, Any]) -> None:
    """Save tensors plus the plain-data metadata needed to rebuild the model. No pickled code."""
    import torch  # here, not at the top: stages that only read and write files skip torch

    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    # Serialise to memory first: torch.save names the zip's root folder after the file it
    # writes to, and the temporary file's random name would make every save differ in bytes.
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "state_dict": state, "meta": meta}, buffer)
    write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> tuple[dict, dict[str, Any]]:
    """Load a checkpoint written by save_checkpoint, never executing code from the file."""
    import torch

    if not Path(path).is_file():
        raise MissingFileError(f"{path}: checkpoint not found; run the stage that writes it")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ArtifactError(f"{path}: not a loadable headstart checkpoint: {error}") from error
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ArtifactError(f"{path}: not a headstart checkpoint (format {CHECKPOINT_FORMAT})")
    return data["state_dict"], data["meta"]


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path` whole.

    Orphaned temporary folders and full disks are handled as in atomic_path; a DiskFullError
    names `path`, not the file inside the temporary folder that was being written.
    """
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(path)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except OSError as error:
        if error.errno in DISK_FULL_ERRNOS:
            raise _disk_full(path, error) from error
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
