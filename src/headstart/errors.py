"""The one error type for problems a user can fix, and its kinds.

A `HeadstartError`'s message names the file or params key and says what to do; stages print it
as one line and exit 1, the `headstart` command likewise with exit code 2. Any other exception is
a bug and keeps its traceback. Each kind also derives from the built-in exception it replaces
(ValueError, FileNotFoundError, MemoryError, OSError), so code that catches those still does.
"""

from __future__ import annotations

import errno

# Errors that mean "the disk (or the user's quota) is full": the fix is the same.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Errors that mean "this output may not be written here" (permissions, a read-only mount).
OUTPUT_DENIED_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


class HeadstartError(Exception):
    """A problem the user can fix; the message names the file or key and the fix."""


class ParamsError(HeadstartError, ValueError):
    """A params.yaml key is missing, unknown, mistyped or out of range."""


class DataError(HeadstartError, ValueError):
    """The image folder, the prepared index or the cached features cannot be used as they are."""


class ArtifactError(HeadstartError, ValueError):
    """A model, weights or calibration file is not what the command needs."""


class MissingFileError(HeadstartError, FileNotFoundError):
    """An input file or folder does not exist; the message says which stage makes it."""


class OutOfMemory(HeadstartError, MemoryError):
    """A batch did not fit in (GPU or CPU) memory; the message names the batch size to lower."""


class DiskFullError(HeadstartError, OSError):
    """No space left while writing an output; `filename` is the output, never a temp file."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class OutputError(HeadstartError, OSError):
    """An output may not be written (permissions, a read-only file system); `filename` is the
    output, never a temp file."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class NonFiniteError(HeadstartError, ValueError):
    """A number to be written to a JSON output is NaN or infinite (training diverged)."""


class UsageError(HeadstartError, ValueError):
    """Bad arguments to a command."""
