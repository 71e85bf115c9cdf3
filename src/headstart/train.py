"""The one training loop, shared by train_head (features -> head) and finetune (images -> model).

What differs between the two is data: the module, its trainable parameters and their groups,
the batches, the number of epochs. The loop: AdamW on the given parameter groups, a per-step
cosine schedule, validation every epoch, early stopping on a chosen validation metric
(`select`; ties broken by validation loss), and the best epoch's weights returned. With `ema`,
an exponential moving average of the weights (torch.optim.swa_utils) is what is validated and
returned; `batch_transform` mixes each training batch (MixUp, CutMix). With `validate_start`,
the starting weights are validated first as epoch 0 and are a candidate like any epoch: a warm
start that no epoch improves on is what comes back. Autocast and channels-last as in
headstart.inference; the weights and the optimizer state stay float32.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from headstart.choices import SELECT
from headstart.distributed import batch_share, data_parallel, is_main_process, sum_over_ranks
from headstart.errors import (
    DISK_FULL_ERRNOS,
    OUTPUT_DENIED_ERRNOS,
    DiskFullError,
    HeadstartError,
    OutputError,
    ParamsError,
)
from headstart.inference import autocast, explain_out_of_memory, to_device, validation_scores

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    best_epoch: int  # 1-based; 0: the starting weights (validate_start), which no epoch beat
    best_val_accuracy: float
    best_val_loss: float
    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)  # each epoch's, validation included
    start_val_accuracy: float | None = None  # the starting weights' (validate_start)
    select: str = "accuracy"  # the val metric that chose best_epoch
    best_val_score: float | None = None  # that metric at best_epoch


def fit(
    model: nn.Module,
    train_batches: Iterable,
    val_batches: Iterable,
    groups: list[dict],
    *,
    epochs: int,
    patience: int,
    label_smoothing: float,
    device: torch.device,
    train_mode: Callable[[nn.Module], None] = lambda m: m.train(),
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    desc: str = "train",
    batch_size_key: str | None = None,
    lr_keys: str = "the learning rates",
    precision: torch.dtype | None = None,
    validate_start: bool = False,
    class_weight: torch.Tensor | None = None,
    select: str = "accuracy",
    ema: float = 0.0,
    batch_transform: Callable | None = None,
) -> FitResult:
    """Train `model` in place and load the best epoch's weights back into it.

    `batch_size_key` (e.g. "finetune.batch_size") is the params key named in the OutOfMemory
    error if a batch does not fit in memory; `lr_keys` are named when the loss stops being
    finite, which stops training (ParamsError) rather than saving NaN weights. `precision`: the
    autocast dtype (None: float32); the weights and the optimizer state stay float32.
    `class_weight` (num_classes,) weights the training loss (balanced_class_weight); the
    validation loss stays unweighted. `select` (one of SELECT) is the val metric the best
    epoch is chosen by; `ema` > 0 keeps an exponential moving average of the weights with that
    decay, updated every step, and validates and returns it instead of the raw weights.
    `batch_transform(inputs, targets) -> (inputs, soft targets)` mixes each training batch.
    Nothing is written here: an error leaves no output.
    """
    if select not in SELECT:
        raise ValueError(f"select must be one of {SELECT}, got {select!r}")
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ValueError("nothing to train: no parameter in the optimizer requires grad")
    model.to(device, memory_format=torch.channels_last)
    # Under torchrun: DistributedDataParallel for the steps; each rank's batches are its share
    # of the global batch (data.DealtBatches), and validation sums over the ranks.
    step_model = data_parallel(model, device)
    optimizer = torch.optim.AdamW(groups)
    # float16 needs loss scaling against gradient underflow; bfloat16 and float32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=precision is torch.float16)
    steps = epochs * len(train_batches)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    weight = None if class_weight is None else class_weight.to(device, torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    averaged = _ema_of(model, ema) if ema > 0 else None
    scored = model if averaged is None else averaged.module  # what is validated and kept
    best: FitResult | None = None
    history: list[dict[str, float]] = []
    epoch_seconds: list[float] = []
    stale = 0
    step = 0
    start_accuracy = None
    with explain_out_of_memory(desc, device, train_batches, batch_size_key):
        if validate_start:
            scores = validation_scores(
                scored, val_batches, device, batch_size_key, precision, f"{desc} validation"
            )
            start_accuracy = scores["accuracy"]
            log.info(
                "%s epoch 0 (the starting weights): val loss %.4f acc %.4f%s",
                desc,
                scores["loss"],
                start_accuracy,
                _selected(scores, select),
            )
            best = _candidate(0, scores, select, scored, history, epoch_seconds)
        for epoch in range(1, epochs + 1):
            started = time.perf_counter()
            train_mode(model)
            total_loss, total_correct, seen = 0.0, 0, 0
            progress = tqdm(
                train_batches,
                desc=f"{desc} epoch {epoch}/{epochs}",
                leave=False,
                disable=not is_main_process(),
            )
            for inputs, targets in progress:
                inputs, targets = to_device(inputs, device), targets.to(device)
                if batch_transform is not None:
                    inputs, targets = batch_transform(inputs, targets)
                # Cosine decay from each group's own learning rate to zero over all steps.
                scale = 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))
                for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = base * scale
                with autocast(device, precision):
                    logits = step_model(inputs).float()
                loss = loss_fn(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                # DDP averages the ranks' gradients; weighting each rank's mean by its share of
                # the global batch makes that the global batch's mean when the shares differ
                # (a last, short batch). 1.0 in one process.
                scaler.scale(loss * batch_share(len(targets))).backward()
                scaler.step(optimizer)
                scaler.update()
                if averaged is not None:
                    averaged.update_parameters(model)
                step += 1
                value = loss.item()
                if not math.isfinite(value):
                    raise ParamsError(
                        f"{desc}: the training loss became {value} at epoch {epoch}, step "
                        f"{step}: training diverged; lower {lr_keys} in params.yaml, or check "
                        "the inputs for huge or non-finite values"
                    )
                total_loss += value * len(targets)
                hard = targets if targets.ndim == 1 else targets.argmax(1)  # mixed: the major
                total_correct += (logits.argmax(1) == hard).sum().item()
                seen += len(targets)
                # Redrawn at tqdm's own pace, not every step: a step on cached features takes
                # about a millisecond, and redrawing the bar every step is then a visible cost.
                progress.set_postfix(loss=f"{total_loss / seen:.4f}", refresh=False)
            scores = validation_scores(
                scored, val_batches, device, batch_size_key, precision, f"{desc} validation"
            )
            val_loss, val_accuracy = scores["loss"], scores["accuracy"]
            total_loss, total_correct, seen = sum_over_ranks([total_loss, total_correct, seen])
            epoch_seconds.append(time.perf_counter() - started)
            record = {
                "epoch": epoch,
                "train_loss": total_loss / seen,
                "train_accuracy": total_correct / seen,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
            }
            if select != "accuracy":
                record[f"val_{select}"] = scores[select]
            log.info(
                "%s epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f%s",
                desc,
                epoch,
                epochs,
                record["train_loss"],
                record["train_accuracy"],
                val_loss,
                val_accuracy,
                _selected(scores, select),
            )
            if on_epoch is not None:
                on_epoch(record)
            improved = best is None or (scores[select], -val_loss) > (
                best.best_val_score,
                -best.best_val_loss,
            )
            if improved:
                best = _candidate(epoch, scores, select, scored, history, epoch_seconds)
                stale = 0
            else:
                stale += 1
            history.append(record)
            if stale >= patience:
                log.info(
                    "%s: early stop after epoch %d (best epoch %d)", desc, epoch, best.best_epoch
                )
                break
    model.load_state_dict(best.state_dict)
    best.start_val_accuracy = start_accuracy
    metric = select.replace("_", " ")
    if best.best_epoch == 0:
        log.warning(
            "%s: no epoch beat the starting weights on val (%s %.4f): keeping them",
            desc,
            metric,
            best.best_val_score,
        )
    else:
        log.info(
            "%s: best epoch %d, val %s %.4f%s",
            desc,
            best.best_epoch,
            metric,
            best.best_val_score,
            " (the moving average of the weights)" if averaged is not None else "",
        )
    return best


def _candidate(epoch, scores, select, model, history, epoch_seconds) -> FitResult:
    """The weights of `model` now, as the best candidate so far, with their val scores."""
    return FitResult(
        epoch,
        scores["accuracy"],
        scores["loss"],
        _snapshot(model),
        history,
        epoch_seconds,
        select=select,
        best_val_score=scores[select],
    )


def _selected(scores: dict[str, float], select: str) -> str:
    """The selected metric for the epoch log line, when it is not accuracy."""
    return "" if select == "accuracy" else f" {select.replace('_', ' ')} {scores[select]:.4f}"


def _ema_of(model: nn.Module, decay: float):
    """torch's AveragedModel keeping an exponential moving average of `model`'s weights and
    buffers (BatchNorm statistics too, when they train), on the same device."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    log.info("weight EMA: decay %g, updated every step; the average is validated and kept", decay)
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def balanced_class_weight(labels, num_classes: int, kind: str) -> torch.Tensor | None:
    """`class_weight: balanced`: N / (num_classes * count of class c), scikit-learn's
    `balanced` (each class then carries the same total weight); None for `none`."""
    if kind == "none":
        return None
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.int64), minlength=num_classes)
    weight = len(labels) / (num_classes * counts.clamp(min=1).to(torch.float64))
    log.info("class weights (balanced): %s", ", ".join(f"{w:.3g}" for w in weight.tolist()))
    return weight.to(torch.float32)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the weights on the CPU, which later steps cannot change."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@contextlib.contextmanager
def training_curves(live_dir: Path) -> Iterator[Any]:
    """A DVCLive `Live` writing the curves into `live_dir`. DVCLive's own writes fail on a full
    disk or a refused folder with an OSError naming no file: here such an error names
    `live_dir`, as headstart's own writers name their output."""
    from dvclive import Live

    try:
        with Live(str(live_dir), save_dvc_exp=False, dvcyaml=None) as live:
            yield live
    except OSError as error:
        if isinstance(error, HeadstartError) or error.filename is not None:
            raise
        reason = os.strerror(error.errno).lower() if error.errno else str(error)
        if error.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(
                error.errno, f"{reason} writing the training curves; free disk space", str(live_dir)
            ) from error
        if error.errno in OUTPUT_DENIED_ERRNOS:
            raise OutputError(
                error.errno,
                f"{reason} writing the training curves; make it writable",
                str(live_dir),
            ) from error
        raise


def live_logger(live) -> Callable[[dict[str, float]], None]:
    """An on_epoch callback that logs one record per step to a DVCLive `Live`."""

    def on_epoch(record: dict[str, float]) -> None:
        for name, value in record.items():
            if name not in ("epoch", "step"):
                live.log_metric(name, value)
        live.next_step()

    return on_epoch
