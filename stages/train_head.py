"""Stage train_head: a classifier on the cached features (seconds on a CPU).

    python stages/train_head.py FEATURES_DIR HEAD_MODEL LIVE_DIR

head.kind picks how (headstart.heads.HEADS: `linear`, torch AdamW with early stopping on val
accuracy; `logreg`, scikit-learn logistic regression with C chosen on val). Every kind is saved
as the same nn.Linear (D -> num_classes), so finetune warm-starts from any. Curves go to
LIVE_DIR through DVCLive. Reads params: head.
"""

import argparse
import logging
from pathlib import Path

import _bootstrap  # noqa: F401  (first: a clear message outside the environment)

from headstart.checkpoints import save_checkpoint
from headstart.environment import describe
from headstart.heads import head_meta, read_features, train_head
from headstart.params import load_params
from headstart.stage import run
from headstart.train import live_logger, training_curves

log = logging.getLogger("headstart.train_head")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("features_dir", type=Path)
    parser.add_argument("head_model", type=Path)
    parser.add_argument("live_dir", type=Path)
    args = parser.parse_args(argv)
    params = load_params().head

    features = read_features(args.features_dir)
    with training_curves(args.live_dir) as live:
        head, summary = train_head(features, params, live_logger(live))
        live.summary.update(summary)
    meta = head_meta(features, params, summary, describe("cpu"))
    save_checkpoint(args.head_model, head.state_dict(), meta)
    log.info("head saved to %s (%s)", args.head_model, summary)


if __name__ == "__main__":
    raise SystemExit(run(main))
