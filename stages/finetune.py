"""Stage finetune: unfreeze the top blocks of the backbone, starting from the trained head.

    python stages/finetune.py DATA_DIR PREPARED_DIR HEAD_MODEL FINETUNED_MODEL LIVE_DIR

Linear probe, then fine-tune (LP-FT): the head starts from train_head's weights, the top
`finetune.unfreeze` blocks train at `lr_backbone` (smaller than the head's), the rest stays
frozen in eval mode; with `bn: frozen` every BatchNorm keeps its pretrained statistics. Early
stopping on val accuracy; the best epoch is kept. With `augment: none` the frozen blocks' output
is computed once and cached (a temporary memory-mapped file), and epochs run only the top
blocks; with augmentation every epoch runs the whole backbone. Autocast at compute.precision,
weights kept in float32. With compute.nproc > 1, runs as that many processes under torchrun
(DistributedDataParallel; the same global batches as one process). Reads params: backbone,
compute (all but batch_size), finetune.
"""

import argparse
import contextlib
import logging
import shutil
import tempfile
from pathlib import Path

from dvclive import Live
from torch.utils.data import DataLoader

from headstart import distributed
from headstart.backbones import build_backbone
from headstart.data import (
    eval_transform,
    image_loader,
    load_prepared,
    sampling,
    train_transform,
)
from headstart.environment import describe
from headstart.io import load_checkpoint, save_checkpoint
from headstart.model import (
    Classifier,
    param_groups,
    precision_name,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_threads,
    set_trainable,
    split_at_cut,
    train_mode,
)
from headstart.params import as_dict, load_params
from headstart.stage import run
from headstart.train import cache_activations, fit, live_logger

log = logging.getLogger("headstart.finetune")
# The cached activations' temporary folder, next to the model; removed on exit, and at the next
# start if a killed run left it.
SCRATCH_PREFIX = ".finetune-activations-"


def main(argv: list[str] | None = None) -> int | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("data_dir", "prepared_dir", "head_model", "finetuned_model", "live_dir"):
        parser.add_argument(name, type=Path)
    args = parser.parse_args(argv)
    params = load_params()
    ft = params.finetune

    prepared = load_prepared(args.data_dir, args.prepared_dir)
    head_state, head_meta = load_checkpoint(args.head_model)
    features = head_meta["features_meta"]
    if head_meta["classes"] != prepared.classes:
        raise ValueError(
            f"{args.head_model}: trained for classes {head_meta['classes']}, but the prepared "
            f"data has {prepared.classes}; rerun extract and train_head (dvc repro)"
        )
    if (code := distributed.relaunch(__file__, argv, params.compute.nproc)) is not None:
        return code
    set_threads(params.compute.threads)
    with distributed.world(resolve_device(params.compute.device)) as (world, device):
        # The cached activations below are computed at this precision too: the same numbers the
        # frozen blocks give inside a training step, so both paths train the same model.
        precision = resolve_precision(params.compute.precision, device, training=True)
        log.info("fine-tuning on %s (%s)", device, precision_name(precision))
        generator = seed_everything(ft.seed)
        model = Classifier(
            build_backbone(params.backbone.name, params.backbone.weights), len(prepared.classes)
        )
        model.head.load_state_dict(head_state)  # warm start: LP-FT
        frozen = set_trainable(model, ft.unfreeze)
        groups = param_groups(model, ft.lr_head, ft.lr_backbone, ft.weight_decay)

        size, mean, std = features["image_size"], features["mean"], features["std"]
        loader_options = {
            "decode_size": size,
            "batch_size": ft.batch_size,
            "num_workers": params.compute.num_workers,
            "world": world,
            "pin_memory": device.type == "cuda",
        }

        def images(split: str, transform, **options) -> DataLoader:
            return image_loader(
                args.data_dir, prepared.split(split), transform, **loader_options, **options
            )

        with contextlib.ExitStack() as stack:
            if ft.augment == "none" and ft.unfreeze < len(model.backbone.blocks):
                # Without pixel-level augmentation the frozen lower blocks compute the same
                # activations every epoch: compute them once, train the top blocks on them.
                log.info(
                    "augment none: caching the activations below the top %d blocks once; "
                    "epochs run only the top blocks",
                    ft.unfreeze,
                )
                bottom, trainee = split_at_cut(model, ft.unfreeze)
                parent = args.finetuned_model.parent
                parent.mkdir(parents=True, exist_ok=True)
                if world.local_rank == 0:
                    for orphan in parent.glob(f"{SCRATCH_PREFIX}*"):  # left by a killed run
                        shutil.rmtree(orphan, ignore_errors=True)
                distributed.barrier(world)  # no rank makes its folder before the sweep
                scratch = Path(
                    stack.enter_context(
                        tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=parent)
                    )
                )
                # Each rank computes its share; every rank gets all of them (DDP draws from all).
                cached = {
                    split: cache_activations(
                        bottom,
                        images(split, eval_transform(size, mean, std)),
                        device,
                        scratch / f"{split}.npy",
                        desc=f"cache {split} activations",
                        batch_size_key="finetune.batch_size",
                        precision=precision,
                        world=world,
                    )
                    for split in ("train", "val")
                }
                # The same batches, in the same order, as image_loader gives (see data.sampling).
                train = DataLoader(
                    cached["train"],
                    **sampling(cached["train"], ft.batch_size, True, generator, world),
                )
                val = DataLoader(
                    cached["val"], **sampling(cached["val"], ft.batch_size, False, None, world)
                )
            else:
                log.info(
                    "augment %s, unfreeze %d of %d blocks: every epoch runs the whole backbone",
                    ft.augment,
                    ft.unfreeze,
                    len(model.backbone.blocks),
                )
                trainee = model
                train = images(
                    "train",
                    train_transform(size, mean, std, ft.augment),
                    shuffle=True,
                    generator=generator,
                )
                val = images("val", eval_transform(size, mean, std))
            live = None
            if world.is_main:  # one record of the curves (every rank sees the same, summed)
                live = stack.enter_context(
                    Live(str(args.live_dir), save_dvc_exp=False, dvcyaml=None)
                )

            result = fit(
                trainee,
                train,
                val,
                groups,
                epochs=ft.epochs,
                patience=ft.patience,
                label_smoothing=ft.label_smoothing,
                device=device,
                train_mode=lambda _: train_mode(model, frozen, ft.bn),
                on_epoch=live_logger(live) if live else None,
                desc="finetune",
                batch_size_key="finetune.batch_size",
                precision=precision,
            )
            if live:
                live.summary.update(
                    {"best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy}
                )
        if not world.is_main:
            return None
        save_checkpoint(
            args.finetuned_model,
            model.state_dict(),
            {
                "kind": "classifier",
                "backbone": params.backbone.name,
                "num_features": model.backbone.num_features,
                "image_size": features["image_size"],
                "mean": features["mean"],
                "std": features["std"],
                "classes": prepared.classes,
                "params": {"backbone": as_dict(params.backbone), "finetune": as_dict(ft)},
                "summary": {
                    "best_epoch": result.best_epoch,
                    "val_accuracy": result.best_val_accuracy,
                },
                "environment": describe(device, precision, world.size),
            },
        )
    log.info("fine-tuned model saved to %s", args.finetuned_model)
    return None


if __name__ == "__main__":
    raise SystemExit(run(main))
