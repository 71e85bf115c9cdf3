"""Fine-tuning: the top blocks of the backbone unfrozen, starting from the trained head (linear
probe, then fine-tune: LP-FT).

The head starts from train_head's weights, the top `finetune.unfreeze` blocks train at
`lr_backbone` (smaller than the head's), the rest stays frozen in eval mode; with `bn: frozen`
every BatchNorm keeps its pretrained statistics. Early stopping on val accuracy; the best epoch
is kept, and the starting model (the linear probe) is validated first as epoch 0, so a run
that no epoch improves ships the probe. With `augment: none` the frozen blocks' output is
computed once and cached (a temporary memory-mapped file), and epochs run only the top blocks;
with augmentation every epoch runs the whole backbone. Under torchrun: DistributedDataParallel,
with the same global batches as one process.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from headstart import distributed
from headstart.backbones import build_backbone
from headstart.environment import describe
from headstart.inference import cache_activations
from headstart.loaders import image_loader, sampling
from headstart.model import Classifier, param_groups, set_trainable, split_at_cut, train_mode
from headstart.runtime import (
    precision_name,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_threads,
)
from headstart.train import (
    FitResult,
    balanced_class_weight,
    fit,
    live_logger,
    training_curves,
)
from headstart.transforms import (
    batch_mix,
    decode_size,
    eval_transform,
    preprocessing,
    train_transform,
)

if TYPE_CHECKING:
    from headstart.index import PreparedData
    from headstart.params import BackboneParams, ComputeParams, FinetuneParams

log = logging.getLogger(__name__)
# The cached activations' temporary folder, in `scratch_dir`; removed on exit, and at the next
# start if a killed run left it.
SCRATCH_PREFIX = ".finetune-activations-"


@dataclass
class Finetuned:
    """A fine-tuned classifier and the metadata its checkpoint carries."""

    model: Classifier
    meta: dict[str, Any]
    fit: FitResult  # the training's history, best epoch and times


def finetune(
    prepared: PreparedData,
    head_state: dict[str, torch.Tensor],
    head_meta: dict[str, Any],
    backbone_params: BackboneParams,
    compute: ComputeParams,
    ft: FinetuneParams,
    *,
    scratch_dir: Path,
    live_dir: Path | None = None,
    cache: bool | None = None,
) -> Finetuned | None:
    """Fine-tune from the head in `head_state`/`head_meta` (train_head's checkpoint); training
    curves go to `live_dir` through DVCLive. Returns the result on rank 0, None on the other
    ranks under torchrun (only rank 0 writes).

    `cache`: train the top blocks on activations cached once at the cut; None (the stage's
    choice) caches exactly when nothing changes the images (`ft.augment` none, no MixUp or
    CutMix). False forces the whole backbone every epoch, so a benchmark can run both paths on
    the same settings.
    """
    mixing = ft.mixup > 0 or ft.cutmix > 0
    if cache is None:
        cache = ft.augment == "none" and not mixing
    elif cache and (ft.augment != "none" or mixing):
        raise ValueError(
            "cached activations cannot be augmented: use finetune.augment none, no mixup/cutmix"
        )
    from headstart.params import as_dict

    features = head_meta["features_meta"]
    set_threads(compute.threads)
    with distributed.world(resolve_device(compute.device)) as (world, device):
        # The cached activations below are computed at this precision too: the same numbers the
        # frozen blocks give inside a training step, so both paths train the same model.
        precision = resolve_precision(compute.precision, device, training=True)
        log.info("fine-tuning on %s (%s)", device, precision_name(precision))
        generator = seed_everything(ft.seed)
        backbone = build_backbone(backbone_params.name, backbone_params.weights, ft.drop_path)
        model = Classifier(backbone, len(prepared.classes))
        model.head.load_state_dict(head_state)  # warm start: LP-FT
        frozen = set_trainable(model, ft.unfreeze)
        groups = param_groups(
            model, ft.lr_head, ft.lr_backbone, ft.weight_decay, layer_decay=ft.layer_decay
        )
        train_labels = prepared.split("train").labels

        steps = preprocessing(features)  # the resize and normalisation the features were made with
        loader_options = {
            "decode_size": decode_size(features),
            "batch_size": ft.batch_size,
            "num_workers": compute.num_workers,
            "world": world,
            "pin_memory": device.type == "cuda",
        }

        def images(split: str, transform, **options) -> DataLoader:
            return image_loader(
                prepared.root, prepared.split(split), transform, **loader_options, **options
            )

        with contextlib.ExitStack() as stack:
            blocks = model.backbone.num_blocks
            use_cache = cache and ft.unfreeze < blocks
            if use_cache and not model.backbone.sequential:
                log.info(
                    "augment none: %s runs as one timm forward, so the frozen blocks' "
                    "activations cannot be cached; every epoch runs the whole backbone",
                    backbone_params.name,
                )
                use_cache = False
            if use_cache:
                # Without pixel-level augmentation the frozen lower blocks compute the same
                # activations every epoch: compute them once, train the top blocks on them.
                log.info(
                    "augment none: caching the activations below the top %d blocks once; "
                    "epochs run only the top blocks",
                    ft.unfreeze,
                )
                bottom, trainee = split_at_cut(model, ft.unfreeze)
                scratch_dir.mkdir(parents=True, exist_ok=True)
                if world.local_rank == 0:
                    for orphan in scratch_dir.glob(f"{SCRATCH_PREFIX}*"):  # left by a killed run
                        shutil.rmtree(orphan, ignore_errors=True)
                distributed.barrier(world)  # no rank makes its folder before the sweep
                scratch = Path(
                    stack.enter_context(
                        tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=scratch_dir)
                    )
                )
                # Each rank computes its share; every rank gets all of them (DDP draws from all).
                cached = {
                    split: cache_activations(
                        bottom,
                        images(split, eval_transform(**steps)),
                        device,
                        scratch / f"{split}.npy",
                        desc=f"cache {split} activations",
                        batch_size_key="finetune.batch_size",
                        precision=precision,
                        world=world,
                    )
                    for split in ("train", "val")
                }
                # The same batches, in the same order, as image_loader gives (see
                # loaders.sampling).
                train = DataLoader(
                    cached["train"],
                    **sampling(
                        cached["train"],
                        ft.batch_size,
                        True,
                        generator,
                        world,
                        ft.sampler,
                        train_labels,
                    ),
                )
                val = DataLoader(
                    cached["val"], **sampling(cached["val"], ft.batch_size, False, None, world)
                )
            else:
                log.info(
                    "augment %s, unfreeze %d of %d blocks: every epoch runs the whole backbone",
                    ft.augment + (" with MixUp/CutMix" if mixing else ""),
                    ft.unfreeze,
                    blocks,
                )
                trainee = model
                train = images(
                    "train",
                    train_transform(ft.augment, **steps),
                    shuffle=True,
                    generator=generator,
                    sampler=ft.sampler,
                )
                val = images("val", eval_transform(**steps))
            live = None
            if world.is_main and live_dir is not None:  # one record of the curves
                live = stack.enter_context(training_curves(live_dir))

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
                lr_keys="finetune.lr_head and finetune.lr_backbone",
                precision=precision,
                # LP-FT: before its first step the model is the linear probe, a candidate too,
                # so fine-tuning never ships a model worse on val than the probe it started as.
                validate_start=True,
                class_weight=balanced_class_weight(
                    train_labels, len(prepared.classes), ft.class_weight
                ),
                select=ft.select,
                ema=ft.ema,
                batch_transform=batch_mix(ft.mixup, ft.cutmix, len(prepared.classes)),
            )
            if live:
                live.summary.update(_summary(result))
        if not world.is_main:
            return None
        meta = {
            "kind": "classifier",
            "backbone": backbone_params.name,
            "num_features": model.backbone.num_features,
            "image_size": features["image_size"],
            "mean": features["mean"],
            "std": features["std"],
            "interpolation": steps["interpolation"],
            "crop_pct": steps["crop_pct"],
            "classes": prepared.classes,
            "params": {"backbone": as_dict(backbone_params), "finetune": as_dict(ft)},
            "summary": _summary(result, "val_accuracy"),
            "environment": describe(device, precision, world.size),
        }
        return Finetuned(model, meta, result)


def _summary(result: FitResult, accuracy_key: str = "best_val_accuracy") -> dict[str, Any]:
    """The best epoch (0: no epoch beat the linear probe it started as, which is what ships),
    its val accuracy (and its `select` metric, when that is not accuracy) and the probe's."""
    summary = {
        "best_epoch": result.best_epoch,
        accuracy_key: result.best_val_accuracy,
        "probe_val_accuracy": result.start_val_accuracy,
    }
    if result.select != "accuracy":
        summary[f"best_val_{result.select}"] = result.best_val_score
    return summary
