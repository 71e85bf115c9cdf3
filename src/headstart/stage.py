"""What every stage script shares: logging, clean errors, and exiting non-zero on interruption.

DVC records a stage's outputs only when it exits 0, so an interrupted stage must never exit 0;
SIGTERM is turned into an exception so temporary files are cleaned up on the way out. Errors
the user can fix (headstart.errors.HeadstartError: bad input or params, a full disk, a batch too
large for memory) end in one line naming the file or key and the fix, and exit code 1; anything
else is a bug: its traceback is logged and the exit code is 3.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable

from headstart.errors import DISK_FULL_ERRNOS, HeadstartError

log = logging.getLogger("headstart")

# Exit codes: 0 done, 1 a problem the user can fix (one line), 3 a bug (with its traceback),
# 130 SIGINT, 143 SIGTERM (docs/faults.md).
INTERNAL_ERROR = 3


class Interrupted(BaseException):
    """Raised from the SIGTERM handler (BaseException, so `except Exception` cannot eat it)."""


def _on_sigterm(signum, frame):
    raise Interrupted(f"signal {signum}")


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Call a stage's main(argv); return the process exit code (main's own, when it returns
    one: a stage run as several processes under torchrun returns torchrun's)."""
    # Under torchrun every process logs; ranks other than 0 only warnings and errors, named.
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s {f'rank {rank} ' if rank else ''}%(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    start = time.perf_counter()
    try:
        code = main(argv)
    except HeadstartError as error:
        log.debug("details", exc_info=True)
        log.error("%s", error)
        return 1
    except OSError as error:  # a full disk outside headstart.io's writers (a library's own)
        if error.errno not in DISK_FULL_ERRNOS:
            return _internal_error()
        log.debug("details", exc_info=True)
        where = error.filename or "writing an output"
        log.error("%s: %s; free disk space and run again", where, os.strerror(error.errno).lower())
        return 1
    except MemoryError:  # the allocator's own, outside a batch (OutOfMemory names the key)
        log.debug("details", exc_info=True)
        log.error("out of memory; lower the batch sizes in params.yaml or use a bigger machine")
        return 1
    except KeyboardInterrupt:
        log.error("interrupted (SIGINT); no output was recorded")
        return 130
    except Interrupted:
        log.error("interrupted (SIGTERM); no output was recorded")
        return 143
    except Exception:  # a bug: the traceback, and a code no input problem gives
        return _internal_error()
    if code is not None:
        # Relaunched under torchrun: rank 0 has logged its own time and memory; this launcher's
        # would read as the stage's (bench/scaling.py takes the last such line).
        return code
    # ru_maxrss is in KiB on Linux; this process only (loader workers are processes of their own).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info("done in %.1f s, peak memory %.0f MiB", time.perf_counter() - start, peak)
    return 0


def _internal_error() -> int:
    """Log the exception being handled, traceback and all, as a bug; the exit code for it."""
    log.exception(
        "internal error: a bug in headstart, not a problem with your input "
        "(traceback below); please report it"
    )
    return INTERNAL_ERROR
