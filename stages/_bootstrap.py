"""Imported first by every stage script: outside the project's environment (`dvc repro` from
.venv/bin without activating it, so `python` is the system one) say what to do in one line,
instead of a ModuleNotFoundError traceback."""

import importlib.util
import sys

if importlib.util.find_spec("headstart") is None:
    sys.exit(
        f"{sys.argv[0]}: the headstart package is not installed for {sys.executable}; "
        "activate the project's environment first (source .venv/bin/activate) or run make repro"
    )
