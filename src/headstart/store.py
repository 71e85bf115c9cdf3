"""The store: per-image work (extract's features, prepare's validation) kept by content, so a
run over a grown dataset computes only the images it has not seen.

An entry is found by a key, the sha256 of everything that can change its bytes (see
extraction.store_key and folders.validation_key), and a name, the image's sha256. It is one
small file, `<root>/<kind>/<key>/<name[:2]>/<name>`: the sha256 of (key, name, payload), then
the payload. Entries are written to a temporary file beside them and renamed into place, so a
reader sees a whole entry or none, and two writers of one entry (queued experiments) write the
same bytes; an entry is used only when its checksum matches, so a torn, truncated or altered
one is a miss and is computed again. The store is a speed-up, never a source of truth: with it
cleared, a stage writes the same bytes.

Where it lives: one store per machine and user (HEADSTART_CACHE_DIR, else
$XDG_CACHE_HOME/headstart, else ~/.cache/headstart), outside every repository, because
`dvc exp run --queue` runs each experiment in a temporary copy of the repository;
HEADSTART_CACHE=off turns it off. Size: capped at HEADSTART_CACHE_SIZE (default 10G); a hit
refreshes its entry's time, and `prune` removes the least recently used first (docs/cache.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headstart.errors import UsageError

log = logging.getLogger(__name__)

LOCATION_VARIABLE = "HEADSTART_CACHE_DIR"
SWITCH_VARIABLE = "HEADSTART_CACHE"
SIZE_VARIABLE = "HEADSTART_CACHE_SIZE"
DEFAULT_SIZE = "10G"
# What the store holds, one folder each under its root; clear and prune touch nothing else.
KINDS = ("features", "prepare")
# The description of a key, beside its entries (for `headstart cache info`).
KEY_FILE = "key.json"
_DIGEST = 32  # bytes of the checksum at the head of an entry
# A temporary file older than this is left by a killed writer: prune removes it.
_ORPHAN_SECONDS = 3600
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def location() -> Path:
    """The store's folder: HEADSTART_CACHE_DIR, else $XDG_CACHE_HOME/headstart, else
    ~/.cache/headstart."""
    if os.environ.get(LOCATION_VARIABLE):
        return Path(os.environ[LOCATION_VARIABLE]).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "headstart"


def switched_on() -> bool:
    """False when HEADSTART_CACHE is off (or 0, false, no); anything else is refused."""
    value = os.environ.get(SWITCH_VARIABLE, "on").strip().lower()
    if value in ("on", "1", "true", "yes", ""):
        return True
    if value in ("off", "0", "false", "no"):
        return False
    raise UsageError(f"{SWITCH_VARIABLE}={value!r}: expected on or off")


def parse_size(text: str, where: str = SIZE_VARIABLE) -> int:
    """'10G', '512M', '1.5G', '200000' (bytes; binary units) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise UsageError(f"{where}={text!r}: expected a size such as 10G, 512M or 200000 (bytes)")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def size_cap() -> int:
    return parse_size(os.environ.get(SIZE_VARIABLE) or DEFAULT_SIZE)


def digest_of(value: Any) -> str:
    """The sha256 of a JSON-ready value, its keys sorted: a key from its description."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def source_digest(*modules) -> str:
    """The sha256 of these modules' source files: a key changes whenever their code does."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def check_location(root: Path, data_root: Path | None) -> None:
    """Refuse a store inside data.dir (or around it: clear would reach the images), or in the
    git work tree of the current folder (the project) where git does not ignore it: the store
    must never change what DVC or git version."""
    real, where = Path(os.path.realpath(root)), f"{LOCATION_VARIABLE}={root}"
    if data_root is not None:
        data = Path(os.path.realpath(data_root))
        if _inside(real, data) or _inside(data, real):
            raise UsageError(
                f"{where} overlaps data.dir ({data_root}); point it outside the data, e.g. "
                "unset it for ~/.cache/headstart"
            )
    here = Path(os.path.realpath(Path.cwd()))
    top = next((p for p in (here, *here.parents) if (p / ".git").exists()), None)
    if top is None or not _inside(real, top):
        return
    try:
        ignored = subprocess.run(
            ["git", "-C", str(top), "check-ignore", "-q", "--no-index", str(real / "x")],
            capture_output=True,
            timeout=30,
        ).returncode
    except (OSError, subprocess.SubprocessError):
        return  # no git here: nothing git could track either
    if ignored == 1:
        raise UsageError(
            f"{where} is inside the git work tree {top} and not ignored; point it outside the "
            "repository (unset it for ~/.cache/headstart) or add it to .gitignore"
        )


def _disk_bytes(stat: os.stat_result) -> int:
    """The space a file takes on disk (whole blocks), or its length where blocks are unknown."""
    blocks = getattr(stat, "st_blocks", None)
    return blocks * 512 if blocks is not None else stat.st_size


@dataclass
class Shelf:
    """The entries of one key of one kind: get, put, and what happened, for the logs."""

    folder: Path
    key: str
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    written: int = 0
    writable: bool = True
    _made: set[str] = field(default_factory=set)

    def _path(self, name: str) -> Path:
        return self.folder / name[:2] / name

    def _checksum(self, name: str, payload: bytes) -> bytes:
        return hashlib.sha256(f"{self.key}:{name}:".encode() + payload).digest()

    def get(self, name: str, touch: bool = True) -> bytes | None:
        """The payload stored under `name`, or None (absent, unreadable or failing its
        checksum: counted, never used). A hit refreshes the entry's time (least recently used
        goes first) unless `touch` is False."""
        path = self._path(name)
        try:
            data = path.read_bytes()
        except OSError:
            self.misses += 1
            return None
        payload = data[_DIGEST:]
        if len(data) < _DIGEST or data[:_DIGEST] != self._checksum(name, payload):
            self.corrupt += 1
            self.misses += 1
            log.warning("store entry %s fails its checksum: computed again", path)
            return None
        if touch:
            with contextlib.suppress(OSError):
                os.utime(path)
        self.hits += 1
        return payload

    def put(self, name: str, payload: bytes) -> None:
        """Store `payload` under `name`: written beside it and renamed into place. A store
        that cannot be written (full, read-only) is warned about once and then left alone:
        the stage's own outputs never depend on it."""
        if not self.writable:
            return
        path = self._path(name)
        tmp = None
        try:
            if path.parent.name not in self._made:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._made.add(path.parent.name)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as handle:
                handle.write(self._checksum(name, payload) + payload)
            os.replace(tmp, path)  # no fsync: a torn entry fails its checksum and is a miss
            tmp = None
            self.written += 1
        except OSError as error:
            self._unwritable(error)
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def _unwritable(self, error: OSError) -> None:
        self.writable = False
        log.warning(
            "store %s cannot be written (%s): results unchanged, not kept", self.folder, error
        )

    def describe(self, description: dict) -> None:
        """Write the key's description beside its entries (what `cache info` shows)."""
        if not self.writable:
            return
        path = self.folder / KEY_FILE
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{KEY_FILE}.", suffix=".tmp", dir=self.folder)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(description, handle, indent=2, sort_keys=True)
            os.replace(tmp, path)
        except OSError as error:
            self._unwritable(error)


def read_description(shelf: Shelf) -> dict:
    try:
        found = json.loads((shelf.folder / KEY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def open_shelf(kind: str, description: dict, data_root: Path | None) -> Shelf | None:
    """The shelf of `kind` for the key `description` hashes to, in this machine's store; None
    when the store is switched off. Refuses a store inside data.dir or a git work tree."""
    if kind not in KINDS:
        raise ValueError(f"unknown store kind {kind!r}; known: {', '.join(KINDS)}")
    if not switched_on():
        log.info("store off (%s=off): every image is computed", SWITCH_VARIABLE)
        return None
    root = location()
    check_location(root, data_root)
    key = digest_of(description)[:32]
    return Shelf(root / kind / key, key)


def _entries(
    root: Path, now: float, kinds: tuple[str, ...] = KINDS
) -> tuple[list[tuple[float, int, Path]], list[Path]]:
    """((time, bytes, path) of every entry, orphaned temporary files) of `kinds` under root."""
    entries, orphans = [], []
    for kind in kinds:
        for key in _scan(root / kind):
            for bucket in _scan(Path(key.path)):
                if not bucket.is_dir(follow_symlinks=False):
                    continue
                for entry in _scan(Path(bucket.path)):
                    stat = entry.stat(follow_symlinks=False)
                    if entry.name.endswith(".tmp"):
                        if now - stat.st_mtime > _ORPHAN_SECONDS:
                            orphans.append(Path(entry.path))
                        continue
                    entries.append((stat.st_mtime, _disk_bytes(stat), Path(entry.path)))
    return entries, orphans


def _scan(folder: Path) -> list[os.DirEntry]:
    try:
        return sorted(os.scandir(folder), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []


def info(root: Path | None = None) -> dict[str, Any]:
    """Location, switch, cap, and per kind: keys, entries, bytes on disk."""
    root = root or location()
    kinds = {}
    for kind in KINDS:
        keys = [k for k in _scan(root / kind) if k.is_dir(follow_symlinks=False)]
        entries, _ = _entries(root, time.time(), (kind,))
        kinds[kind] = {
            "keys": len(keys),
            "entries": len(entries),
            "bytes": sum(size for _, size, _ in entries),
        }
    return {
        "location": str(root),
        "on": switched_on(),
        "max_bytes": size_cap(),
        "bytes": sum(k["bytes"] for k in kinds.values()),
        "kinds": kinds,
    }


def prune(max_bytes: int | None = None, root: Path | None = None) -> dict[str, int]:
    """Remove the least recently used entries until the store takes at most `max_bytes` (the
    cap by default) on disk, and temporary files killed writers left; empty keys go too.
    Safe beside running stages: one that finds an entry gone computes it."""
    root = root or location()
    cap = size_cap() if max_bytes is None else max_bytes
    entries, orphans = _entries(root, time.time())
    for orphan in orphans:
        with contextlib.suppress(OSError):
            orphan.unlink()
    total = sum(size for _, size, _ in entries)
    removed = freed = 0
    for _, size, path in sorted(entries):  # oldest first
        if total - freed <= cap:
            break
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        removed += 1
        freed += size
    if removed:
        for kind in KINDS:
            for key in _scan(root / kind):
                buckets = [b for b in _scan(Path(key.path)) if b.is_dir(follow_symlinks=False)]
                for bucket in buckets:
                    with contextlib.suppress(OSError):
                        os.rmdir(bucket.path)  # only when empty
                if not any(b.is_dir() for b in _scan(Path(key.path))):
                    shutil.rmtree(key.path, ignore_errors=True)
        log.info("store: removed %d least recently used entries (%d bytes)", removed, freed)
    return {"removed": removed, "freed_bytes": freed, "bytes": total - freed}


def prune_quietly() -> None:
    """`prune` to the cap after a stage wrote entries; a failure only warns."""
    try:
        prune()
    except (OSError, UsageError) as error:
        log.warning("store %s could not be pruned (%s)", location(), error)


def clear(root: Path | None = None) -> int:
    """Remove every entry of every kind (nothing else under root); returns bytes freed.
    Results never change: the next run computes again what it needs."""
    root = root or location()
    freed = info(root)["bytes"]
    for kind in KINDS:
        shutil.rmtree(root / kind, ignore_errors=True)
    return freed
