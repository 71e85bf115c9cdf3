"""Stage finetune: unfreeze the top blocks of the backbone, starting from the trained head.

    python stages/finetune.py DATA_DIR PREPARED_DIR HEAD_MODEL FINETUNED_MODEL LIVE_DIR

Linear probe, then fine-tune (LP-FT; headstart.finetuning says how). Writes FINETUNED_MODEL (a
checkpoint: state dict plus the metadata to rebuild it) and the training curves to LIVE_DIR
through DVCLive. With compute.nproc > 1, runs as that many processes under torchrun
(DistributedDataParallel; the same global batches as one process). Reads params: backbone,
compute, finetune.
"""

import argparse
import logging
from pathlib import Path

import _bootstrap  # noqa: F401  (first: a clear message outside the environment)

from headstart import distributed
from headstart.checkpoints import save_checkpoint
from headstart.errors import DataError
from headstart.finetuning import finetune
from headstart.index import load_prepared
from headstart.model import load_head
from headstart.params import load_params
from headstart.stage import run

log = logging.getLogger("headstart.finetune")


def main(argv: list[str] | None = None) -> int | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("data_dir", "prepared_dir", "head_model", "finetuned_model", "live_dir"):
        parser.add_argument(name, type=Path)
    args = parser.parse_args(argv)
    params = load_params()

    prepared = load_prepared(args.data_dir, args.prepared_dir)
    head, head_meta = load_head(args.head_model)
    if head_meta["classes"] != prepared.classes:
        raise DataError(
            f"{args.head_model}: trained for classes {head_meta['classes']}, but the prepared "
            f"data has {prepared.classes}; rerun extract and train_head (dvc repro)"
        )
    if (code := distributed.relaunch(__file__, argv, params.compute.nproc)) is not None:
        return code
    result = finetune(
        prepared,
        head.state_dict(),
        head_meta,
        params.backbone,
        params.compute,
        params.finetune,
        scratch_dir=args.finetuned_model.parent,
        live_dir=args.live_dir,
    )
    if result is not None:  # rank 0 (or the only process) writes
        save_checkpoint(args.finetuned_model, result.model.state_dict(), result.meta)
        log.info("fine-tuned model saved to %s", args.finetuned_model)
    return None


if __name__ == "__main__":
    raise SystemExit(run(main))
