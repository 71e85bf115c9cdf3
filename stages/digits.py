"""Stage digits: write scikit-learn's handwritten digits as an ImageFolder of PNG files.

The built-in dataset (1,797 real 8x8 scans, 10 classes, shipped inside scikit-learn) goes through
the same ImageFolder path as a user's own images.

    python stages/digits.py OUT_DIR
"""

import argparse
import logging
from pathlib import Path

import _bootstrap  # noqa: F401  (first: a clear message outside the environment)

from headstart.builtin import write_digits
from headstart.io import atomic_dir
from headstart.stage import run

log = logging.getLogger("headstart.digits")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    with atomic_dir(args.out_dir) as tmp:
        count = write_digits(tmp)
    log.info("wrote %d digit images to %s", count, args.out_dir)


if __name__ == "__main__":
    raise SystemExit(run(main))
