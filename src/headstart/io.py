"""Files: atomic writes, JSON, feature arrays and self-describing checkpoints.

Every output goes to a temporary file in its destination folder and is moved into place with
`os.replace`, so an interrupted stage never leaves a half-written file behind. A process killed
outright (SIGKILL, power loss) cannot clean up its temporary file; the next write to the same
path removes such orphans. A full disk raises `DiskFullError` naming the file, and the previous
version of the file stays as it was; so does a refused write (a read-only folder or file
system: `OutputError` naming the output and the fix).

Text for people and text for files: `printable` escapes what must not reach a terminal raw
(control characters, names that are not valid UTF-8), `csv_text` renders CSV that reads back
to the same values whatever the strings hold.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from headstart.errors import (
    DISK_FULL_ERRNOS,
    OUTPUT_DENIED_ERRNOS,
    DiskFullError,
    HeadstartError,
    NonFiniteError,
    OutputError,
)

log = logging.getLogger(__name__)


# --- text for people and for files -------------------------------------------------------


def _escape(char: str) -> str:
    if 0xDC80 <= ord(char) <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode keeps it
        return f"\\x{ord(char) - 0xDC00:02x}"
    return repr(char)[1:-1]  # \n, \x1b, \u202e, \udcff: as Python writes it


def printable(text: str) -> str:
    """`text` safe to show a person on a terminal: control and format characters (ANSI
    escapes, newlines, bidi overrides) and bytes that are not UTF-8 written as escapes
    ("\\x1b[31m", "\\n", "\\xff"); everything else unchanged. For logs and tables only:
    JSON and CSV outputs keep the true value."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def is_utf8(text: str) -> bool:
    """Whether `text` can be written as UTF-8: False for a name holding bytes that are not
    valid UTF-8 (os.scandir and os.fsdecode keep them as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utf8_safe(text: str) -> str:
    """`text`, with the bytes that are not valid UTF-8 written as \\xNN escapes: a name that
    can be stored in JSON and CSV and still tells a person which file it was."""
    if is_utf8(text):
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the name's own bytes
    except UnicodeEncodeError:  # a surrogate no file system decoding makes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def csv_text(header: list[str], rows: Iterable[list[Any]]) -> str:
    """Header and rows as CSV ("\\n" line ends) that csv.reader reads back to the same values,
    whatever the strings hold. The csv module quotes a field holding the delimiter, a quote or
    "\\n", but not one holding "\\r" when lines end in "\\n", and a bare "\\r" ends a
    line for the reader: such a row is written with every field quoted. Every other row has the
    bytes csv.writer gives it."""
    buffer = io.StringIO()
    plain = csv.writer(buffer, lineterminator="\n")
    quoted = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for row in [header, *rows]:
        needs_quotes = any(value is not None and "\r" in str(value) for value in row)
        (quoted if needs_quotes else plain).writerow(row)
    return buffer.getvalue()


# --- atomic writes -------------------------------------------------------------------------


def _disk_full(path: Path, error: OSError) -> DiskFullError:
    reason = os.strerror(error.errno).lower()
    return DiskFullError(
        error.errno,
        f"{reason}; free disk space and run again (any previous version is unchanged)",
        str(path),
    )


def _existing_folder(path: Path) -> Path:
    """The folder that has to be writable to create `path`: its nearest existing ancestor."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _output_denied(path: Path, error: OSError, folder: Path | None = None) -> OutputError:
    """`folder`: the one to make writable, when it is not the one `path` is created in."""
    reason = os.strerror(error.errno).lower()
    return OutputError(
        error.errno,
        f"{reason}; make {folder or _existing_folder(path)} writable or choose another output "
        "(any previous version is unchanged)",
        str(path),
    )


def _translate(path: Path, error: OSError, ours: bool) -> OSError:
    """The error to raise for `error` while writing `path`: a full disk always names `path`; a
    refused write (EACCES, EPERM, EROFS) does when it came from the write itself (`ours`), not
    from reading an input inside the `with` block."""
    if error.errno in DISK_FULL_ERRNOS:
        return _disk_full(path, error)
    if error.errno in OUTPUT_DENIED_ERRNOS and ours:
        return _output_denied(path, error)
    return error


def _inside(error: OSError, folder: Path | None) -> bool:
    """Whether `error` names a file at or below `folder` (the temporary file or folder)."""
    if folder is None or error.filename is None:
        return False
    try:
        return Path(os.fsdecode(error.filename)).is_relative_to(folder)
    except TypeError:  # a file descriptor
        return False


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
    previous content; ENOSPC/EDQUOT become a DiskFullError that names `path`, and a refused
    write (EACCES, EPERM, EROFS: a read-only folder, file or file system) an OutputError that
    names `path` and the folder to make writable.
    """
    tmp_path: Path | None = None
    in_body = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(path)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get normal modes
        in_body = True
        yield tmp_path
        in_body = False
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except OSError as error:
        if isinstance(error, HeadstartError):  # already names its output
            raise
        translated = _translate(path, error, not in_body or _inside(error, tmp_path))
        if translated is error:
            raise
        raise translated from error
    finally:
        if tmp_path is not None:
            with contextlib.suppress(OSError):  # the next write removes an orphan left here
                tmp_path.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def _non_finite(value: Any, where: str = "", seen: frozenset[int] = frozenset()):
    """(key path, number) of the first NaN or infinite float in a JSON-like value, or None
    (also for a container that holds itself: json.dumps says what is wrong with that)."""
    if isinstance(value, float) and not np.isfinite(value):
        return where or "the value", value
    if id(value) in seen:
        return None
    if isinstance(value, dict):
        items = [(f"{where}.{key}" if where else str(key), v) for key, v in value.items()]
    elif isinstance(value, list | tuple):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None
    for key, item in items:
        found = _non_finite(item, key, seen | {id(value)})
        if found is not None:
            return found
    return None


def write_json(path: Path, value: Any) -> None:
    """`value` as JSON (indented, UTF-8). NaN and infinity are not JSON: a NonFiniteError
    naming the file and the key, and nothing is written (the previous file stays)."""
    try:
        text = json.dumps(value, indent=2, sort_keys=False, ensure_ascii=False, allow_nan=False)
    except ValueError as error:
        found = _non_finite(value)
        if found is None:  # another ValueError (a circular reference): a bug
            raise
        where, number = found
        raise NonFiniteError(
            f"{path}: {printable(where)} is {number}, not a finite number, so it cannot be "
            "written as JSON; training likely diverged: lower the learning rates (head.lr, "
            "finetune.lr_head, finetune.lr_backbone in params.yaml) and run again (any previous "
            "version is unchanged)"
        ) from error
    write_text(path, text + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    """Rows that csv.reader (read_csv) reads back to the same values: see csv_text."""
    write_text(path, csv_text(header, rows))


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


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path` whole.

    Orphaned temporary folders, full disks and refused writes are handled as in atomic_path;
    a DiskFullError or OutputError names `path`, not the file inside the temporary folder that
    was being written. A refused read of an input inside the `with` block is not an output's
    problem: it propagates as it was.
    """
    tmp: Path | None = None
    in_body = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(path)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        in_body = True
        yield tmp
        in_body = False
        blocked = _read_only_folder(path)
        if blocked is not None:
            denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(blocked))
            raise _output_denied(path, denied, blocked)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except OSError as error:
        if isinstance(error, HeadstartError) and error.filename == str(path):
            raise  # already names this output
        # A DiskFullError or OutputError of a file inside the temporary folder names that
        # file: named again here as `path`.
        translated = _translate(path, error, not in_body or _inside(error, tmp))
        if translated is error:
            raise
        raise translated from error
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _read_only_folder(path: Path) -> Path | None:
    """A folder in the existing output folder `path` (itself included) whose entries cannot be
    removed, or None. Checked before anything is removed: rmtree(ignore_errors) would delete
    what it can of such a folder and os.replace then fail, leaving neither version whole."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return None
    except FileNotFoundError:
        return None
    # os.walk visits every real sub-folder once as dirpath (links to folders are not followed,
    # and removing a link needs only its parent writable).
    for dirpath, _, _ in os.walk(path):
        if not os.access(dirpath, os.W_OK | os.X_OK):
            return Path(dirpath)
    return None
