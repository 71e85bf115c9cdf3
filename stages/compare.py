"""Stage compare: the backbone leaderboard, from every candidate's scores.

    python stages/compare.py SCORES_DIR FEATURES_DIR BACKBONES_JSON PLOT_JSON

Reads SCORES_DIR/<name>/head.json and FEATURES_DIR/<name>/timing.json for each name in
compare.backbones and
writes BACKBONES_JSON (ranked by val accuracy, then macro-F1; `best` names the winner) and
PLOT_JSON (one row per backbone, for `dvc plots`). Reads params: compare.backbones.
"""

import argparse
from pathlib import Path

import _bootstrap  # noqa: F401  (first: a clear message outside the environment)

from headstart.io import write_json
from headstart.leaderboard import rank
from headstart.params import load_params
from headstart.stage import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scores_dir", type=Path)
    parser.add_argument("features_dir", type=Path)
    parser.add_argument("backbones_json", type=Path)
    parser.add_argument("plot_json", type=Path)
    args = parser.parse_args(argv)
    names = load_params().compare.backbones

    summary, rows = rank(names, args.scores_dir, args.features_dir)
    write_json(args.backbones_json, summary)
    write_json(args.plot_json, rows)


if __name__ == "__main__":
    raise SystemExit(run(main))
