"""Stage extract: run the frozen pretrained backbone once over every indexed image.

    python stages/extract.py DATA_DIR PREPARED_DIR FEATURES_DIR [--reuse-from DIR]

Writes FEATURES_DIR/{train,val,test}_features.npy (N, D) float32 pooled pre-logits features,
FEATURES_DIR/{split}_labels.npy (N,) int64 class indices, and FEATURES_DIR/meta.json (backbone,
input size, preprocessing, classes, environment). With compute.nproc > 1, runs as that many
processes under torchrun, each on its share of the batches; the files are the same, in the same
order. Reads params: backbone, compute, inference.

--reuse-from DIR copies a leaderboard extraction under DIR that is exactly what this run would
compute (same backbone, weights, size, images and environment) instead of recomputing it.
"""

import argparse
from pathlib import Path

import _bootstrap  # noqa: F401  (first: a clear message outside the environment)

from headstart import distributed
from headstart.extraction import extract_features
from headstart.index import load_prepared
from headstart.params import load_params
from headstart.stage import run


def main(argv: list[str] | None = None) -> int | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("prepared_dir", type=Path)
    parser.add_argument("features_dir", type=Path)
    parser.add_argument("--reuse-from", type=Path)
    args = parser.parse_args(argv)
    params = load_params()
    prepared = load_prepared(args.data_dir, args.prepared_dir)
    if (code := distributed.relaunch(__file__, argv, params.compute.nproc)) is not None:
        return code
    extract_features(
        prepared,
        params.backbone,
        params.compute,
        params.inference,
        args.features_dir,
        reuse_from=args.reuse_from,
    )
    return None


if __name__ == "__main__":
    raise SystemExit(run(main))
