"""Stage compare_head: one leaderboard candidate's head, scored on the validation split.

    python stages/compare_head.py FEATURES_DIR SCORE_JSON

Trains a head with the `head` params on the candidate's cached features (FEATURES_DIR, written
by compare_extract) and writes its val accuracy, macro-F1, feature width and parameter count
to SCORE_JSON. The head itself is not kept: the leaderboard compares backbones, and the chosen
one is trained by the main pipeline. Reads params: head.
"""

import argparse
import logging
from pathlib import Path

import _bootstrap  # noqa: F401  (first: a clear message outside the environment)

from headstart.heads import read_features, train_head
from headstart.io import write_json
from headstart.leaderboard import score_head
from headstart.params import load_params
from headstart.stage import run

log = logging.getLogger("headstart.compare_head")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("features_dir", type=Path)
    parser.add_argument("score_json", type=Path)
    args = parser.parse_args(argv)
    params = load_params().head

    features = read_features(args.features_dir)
    head, _ = train_head(features, params)
    score = score_head(features, head)
    args.score_json.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.score_json, score)
    log.info("%s: val accuracy %.4f", score["backbone"], score["val_accuracy"])


if __name__ == "__main__":
    raise SystemExit(run(main))
