"""Stage compare_extract: one leaderboard candidate's features, extracted once.

    python stages/compare_extract.py DATA_DIR PREPARED_DIR FEATURES_DIR NAME

As extract, for backbone NAME (an entry of compare.backbones) with compare.weights and
compare.image_size, into FEATURES_DIR (data/compare/NAME), plus FEATURES_DIR/timing.json: the
extraction's images/s on this machine. The timing lives in the DVC-cached folder, so a run
restored from the run-cache on another machine brings the timing of the machine that ran it.
The main extract reuses these files when backbone.name is NAME with
the same settings. Reads params: compare.weights, compare.image_size, compute, inference.
"""

import argparse
from pathlib import Path

import _bootstrap  # noqa: F401  (first: a clear message outside the environment)

from headstart import distributed
from headstart.extraction import extract_features
from headstart.index import load_prepared
from headstart.io import write_json
from headstart.leaderboard import TIMING_FILE
from headstart.params import BackboneParams, load_params
from headstart.stage import run


def main(argv: list[str] | None = None) -> int | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("prepared_dir", type=Path)
    parser.add_argument("features_dir", type=Path)
    parser.add_argument("name")
    args = parser.parse_args(argv)
    params = load_params()
    candidate = BackboneParams(args.name, params.compare.weights, params.compare.image_size)
    prepared = load_prepared(args.data_dir, args.prepared_dir)
    if (code := distributed.relaunch(__file__, argv, params.compute.nproc)) is not None:
        return code
    timing = extract_features(
        prepared, candidate, params.compute, params.inference, args.features_dir
    )
    if timing is not None:  # rank 0
        write_json(args.features_dir / TIMING_FILE, timing)
    return None


if __name__ == "__main__":
    raise SystemExit(run(main))
