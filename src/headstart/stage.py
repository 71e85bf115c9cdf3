"""What every stage script shares: logging, clean errors, and exiting non-zero on interruption.

DVC records a stage's outputs only when it exits 0, so an interrupted stage must never exit 0;
SIGTERM is turned into an exception so temporary files are cleaned up on the way out.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable

log = logging.getLogger("headstart")


class Interrupted(BaseException):
    """Raised from the SIGTERM handler (BaseException, so `except Exception` cannot eat it)."""


def _on_sigterm(signum, frame):
    raise Interrupted(f"signal {signum}")


def run(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> int:
    """Call a stage's main(argv); return the process exit code."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as error:
        log.debug("details", exc_info=True)
        log.error("%s", error)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted (SIGINT); no output was recorded")
        return 130
    except Interrupted:
        log.error("interrupted (SIGTERM); no output was recorded")
        return 143
    return 0
