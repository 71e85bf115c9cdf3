"""Stage train_head: a linear classifier on the cached features (seconds on a CPU).

    python stages/train_head.py FEATURES_DIR HEAD_MODEL LIVE_DIR

head.kind linear: torch AdamW + cosine schedule, early stopping on val accuracy, best epoch
kept. head.kind logreg: scikit-learn logistic regression, C chosen on val. Both are saved as
the same nn.Linear (D -> num_classes) so finetune warm-starts from either. Curves go to
LIVE_DIR through DVCLive. Reads params: head.
"""

import argparse
import logging
from pathlib import Path

import torch
from dvclive import Live
from torch import nn

from headstart.environment import describe
from headstart.io import read_array, read_json, save_checkpoint
from headstart.model import seed_everything
from headstart.params import as_dict, load_params
from headstart.stage import run
from headstart.train import fit, fit_logreg, live_logger, tensor_batches

log = logging.getLogger("headstart.train_head")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("features_dir", type=Path)
    parser.add_argument("head_model", type=Path)
    parser.add_argument("live_dir", type=Path)
    args = parser.parse_args(argv)
    params = load_params().head

    meta = read_json(args.features_dir / "meta.json")
    train_x, train_y, val_x, val_y = (
        read_array(args.features_dir / f"{split}_{part}.npy")
        for split in ("train", "val")
        for part in ("features", "labels")
    )
    num_classes = len(meta["classes"])
    generator = seed_everything(params.seed)

    with Live(str(args.live_dir), save_dvc_exp=False, dvcyaml=None) as live:
        on_epoch = live_logger(live)

        if params.kind == "logreg":
            head, summary = fit_logreg(
                train_x, train_y, val_x, val_y, num_classes, params.seed, on_epoch
            )
        else:
            head = nn.Linear(meta["num_features"], num_classes)
            train = tensor_batches(
                torch.from_numpy(train_x),
                torch.from_numpy(train_y),
                params.batch_size,
                shuffle=True,
                generator=generator,
            )
            val = tensor_batches(torch.from_numpy(val_x), torch.from_numpy(val_y), 1024)
            groups = [
                {
                    "params": list(head.parameters()),
                    "lr": params.lr,
                    "weight_decay": params.weight_decay,
                }
            ]
            result = fit(
                head,
                train,
                val,
                groups,
                epochs=params.epochs,
                patience=params.patience,
                label_smoothing=params.label_smoothing,
                device=torch.device("cpu"),
                on_epoch=on_epoch,
                desc="head",
                batch_size_key="head.batch_size",
            )
            summary = {
                "best_epoch": result.best_epoch,
                "best_val_accuracy": result.best_val_accuracy,
            }
        live.summary.update(summary)

    save_checkpoint(
        args.head_model,
        head.state_dict(),
        {
            "kind": "head",
            "in_features": meta["num_features"],
            "classes": meta["classes"],
            "features_meta": meta,
            "params": as_dict(params),
            "summary": summary,
            "environment": describe("cpu"),
        },
    )
    log.info("head saved to %s (%s)", args.head_model, summary)


if __name__ == "__main__":
    raise SystemExit(run(main))
