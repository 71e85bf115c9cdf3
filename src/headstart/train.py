"""The one training loop, shared by train_head (features -> head) and finetune (images -> model).

What differs between the two is data: the module, its trainable parameters and their groups,
the batches, the number of epochs. The loop: AdamW on the given parameter groups, a per-step
cosine schedule, validation every epoch, early stopping on validation accuracy (ties broken by
validation loss), and the best epoch's weights returned.

Forward passes run under autocast when given a `precision` dtype (bfloat16 on CPUs and GPUs
that have it, see model.resolve_precision), and image batches in channels-last memory format,
which oneDNN and cuDNN convolutions prefer; outputs are returned in float32.

Running out of memory (CUDA, or the CPU allocator) in training or inference raises
`OutOfMemory`, whose one-line message names the params key of the batch size to lower.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from headstart.distributed import (
    SINGLE,
    World,
    batch_share,
    data_parallel,
    gather_in_order,
    is_main_process,
    sum_over_ranks,
)

log = logging.getLogger(__name__)

# Said when the caller did not name its batch size key: the keys that set batch sizes.
_BATCH_SIZE_KEYS = "head.batch_size, finetune.batch_size or compute.batch_size"


class OutOfMemory(MemoryError):
    """A batch did not fit in (GPU or CPU) memory; the message says which setting to lower.

    A MemoryError, so stage.run reports it in one line and exits 1 whatever raised it.
    """


def _is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or a RuntimeError from another allocator that says so."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    # CPU: "DefaultCPUAllocator: can't allocate memory: ..."; MPS: "MPS backend out of memory".
    message = str(error).lower()
    return "out of memory" in message or "can't allocate memory" in message


@contextlib.contextmanager
def _explain_out_of_memory(
    desc: str, device: torch.device, batches: Iterable, batch_size_key: str | None
) -> Iterator[None]:
    """Turn an out-of-memory RuntimeError into OutOfMemory, naming the batch size to lower."""
    try:
        yield
    except RuntimeError as error:
        if not _is_out_of_memory(error):
            raise
        batch_size = getattr(batches, "batch_size", None)  # a DataLoader's; None if unknown
        cause = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        fix = (
            f"lower {batch_size_key} in params.yaml"
            if batch_size_key
            else f"lower the batch size in params.yaml ({_BATCH_SIZE_KEYS})"
        )
        if batch_size_key and batch_size and batch_size > 1:
            fix += f", e.g. dvc exp run -S {batch_size_key}={batch_size // 2}"
        size = f" with batches of {batch_size}" if batch_size else ""
        raise OutOfMemory(
            f"{desc}: out of memory on {device}{size} ({cause or type(error).__name__}); {fix}"
        ) from error


def _autocast(device: torch.device, precision: torch.dtype | None):
    return torch.autocast(device.type, dtype=precision, enabled=precision is not None)


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc's malloc_trim; a no-op
    elsewhere). Batch after batch, tensors of many sizes come and go, and glibc keeps what
    they freed scattered over its heaps, so extraction's peak memory crept up with the number
    of batches. The extract stage alone on bench/scaling.py's images (MobileNetV3-S at 224 px),
    peak MiB at 10,000 / 50,000 images: 1,002-1,182 at 10,000 without it (the scaling bench's
    own run: 1,003 / 1,307), 1,004-1,008 / 1,063 trimmed every 16 batches (iter_inference),
    917-933 / 972 trimmed after every batch (not kept: its time cost was not measurable apart
    from the machine's noise, so the cheaper schedule won)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_glibc()


def _to_device(inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Images (4-d batches) go channels-last; feature batches as they are."""
    if inputs.ndim == 4:
        return inputs.to(device, memory_format=torch.channels_last, non_blocking=True)
    return inputs.to(device, non_blocking=True)


@dataclass
class FitResult:
    best_epoch: int  # 1-based
    best_val_accuracy: float
    best_val_loss: float
    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)


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
    precision: torch.dtype | None = None,
) -> FitResult:
    """Train `model` in place and load the best epoch's weights back into it.

    `batch_size_key` (e.g. "finetune.batch_size") is the params key named in the OutOfMemory
    error if a batch does not fit in memory. `precision`: the autocast dtype (None: float32);
    the weights and the optimizer state stay float32. Nothing is written here: an error leaves
    no output.
    """
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
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    best: FitResult | None = None
    history: list[dict[str, float]] = []
    stale = 0
    step = 0
    with _explain_out_of_memory(desc, device, train_batches, batch_size_key):
        for epoch in range(1, epochs + 1):
            train_mode(model)
            total_loss, total_correct, seen = 0.0, 0, 0
            progress = tqdm(
                train_batches,
                desc=f"{desc} epoch {epoch}/{epochs}",
                leave=False,
                disable=not is_main_process(),
            )
            for inputs, targets in progress:
                inputs, targets = _to_device(inputs, device), targets.to(device)
                # Cosine decay from each group's own learning rate to zero over all steps.
                scale = 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))
                for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = base * scale
                with _autocast(device, precision):
                    logits = step_model(inputs).float()
                loss = loss_fn(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                # DDP averages the ranks' gradients; weighting each rank's mean by its share of
                # the global batch makes that the global batch's mean when the shares differ
                # (a last, short batch). 1.0 in one process.
                scaler.scale(loss * batch_share(len(targets))).backward()
                scaler.step(optimizer)
                scaler.update()
                step += 1
                total_loss += loss.item() * len(targets)
                total_correct += (logits.argmax(1) == targets).sum().item()
                seen += len(targets)
                # Redrawn at tqdm's own pace, not every step: with a head on cached features a
                # step is about a millisecond; redrawing the bar every step cost train_head about
                # 6% (8.3 and 7.9 s vs 7.6 and 7.4 s on 4,000 photos' features, two runs each).
                progress.set_postfix(loss=f"{total_loss / seen:.4f}", refresh=False)
            val_loss, val_accuracy = evaluate_loss_accuracy(
                model, val_batches, device, batch_size_key, precision
            )
            total_loss, total_correct, seen = sum_over_ranks([total_loss, total_correct, seen])
            record = {
                "epoch": epoch,
                "train_loss": total_loss / seen,
                "train_accuracy": total_correct / seen,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
            }
            log.info(
                "%s epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f",
                desc,
                epoch,
                epochs,
                record["train_loss"],
                record["train_accuracy"],
                val_loss,
                val_accuracy,
            )
            if on_epoch is not None:
                on_epoch(record)
            improved = best is None or (val_accuracy, -val_loss) > (
                best.best_val_accuracy,
                -best.best_val_loss,
            )
            if improved:
                state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                best = FitResult(epoch, val_accuracy, val_loss, state, history)
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
    log.info("%s: best epoch %d, val accuracy %.4f", desc, best.best_epoch, best.best_val_accuracy)
    return best


def iter_inference(
    model: nn.Module,
    batches: Iterable,
    device: torch.device,
    desc: str = "predict",
    batch_size_key: str | None = None,
    precision: torch.dtype | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Run `model` in eval mode over the batches; yield (outputs (B, ...) float32, labels (B,)
    int64) per batch, so a caller can stream them to disk.

    `batch_size_key` is named in the OutOfMemory error, `precision` is the autocast dtype, as
    in fit.
    """
    model.eval().to(device, memory_format=torch.channels_last)
    with _explain_out_of_memory(desc, device, batches, batch_size_key):
        progress = tqdm(batches, desc=desc, leave=False, disable=not is_main_process())
        for number, (inputs, targets) in enumerate(progress, start=1):
            with torch.inference_mode(), _autocast(device, precision):
                outputs = model(_to_device(inputs, device)).float().cpu()
            yield outputs.numpy(), torch.as_tensor(targets).numpy().astype(np.int64)
            if number % 16 == 0:
                release_freed_memory()


def tensor_batches(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> torch.utils.data.DataLoader:
    """Batches of in-memory tensors (cached features), one indexing per batch where a
    TensorDataset looks up every row and stacks them. The same batches in the same order,
    drawing the same numbers from `generator`, as
    DataLoader(TensorDataset(inputs, targets), batch_size, shuffle=shuffle, generator=generator).
    """
    rows = _Rows(inputs, targets)
    if shuffle:
        order = torch.utils.data.RandomSampler(rows, generator=generator)
    else:
        order = torch.utils.data.SequentialSampler(rows)
    return torch.utils.data.DataLoader(
        rows,
        sampler=torch.utils.data.BatchSampler(order, batch_size, drop_last=False),
        batch_size=None,  # the sampler gives whole batches of row positions
        generator=generator,
    )


class _Rows(torch.utils.data.TensorDataset):
    """A TensorDataset indexed by a list of row positions at once."""

    def __getitem__(self, positions: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(positions)  # one conversion, not one per tensor
        return tuple(tensor[index] for tensor in self.tensors)


def cache_activations(
    module: nn.Module,
    batches,
    device: torch.device,
    path,
    desc: str,
    batch_size_key: str | None = None,
    precision: torch.dtype | None = None,
    world: World = SINGLE,
) -> torch.utils.data.TensorDataset:
    """Run a frozen `module` once over an (unshuffled) image DataLoader; return a dataset of
    (its output, label) pairs, the outputs streamed to a memory-mapped float32 .npy at `path`
    (memory stays one batch however many images). Under torchrun each rank runs its share of
    the batches and every rank gets all the outputs, in order."""
    from headstart.io import open_array

    rows = len(batches.dataset)
    num_batches = math.ceil(rows / batches.batch_size)
    outputs, labels, start = None, np.empty(rows, dtype=np.int64), 0
    mine = iter_inference(module, batches, device, desc, batch_size_key, precision)
    for batch_outputs, batch_labels in gather_in_order(mine, world, num_batches, everywhere=True):
        if outputs is None:
            outputs = open_array(path, (rows, *batch_outputs.shape[1:]), np.float32)
        end = start + len(batch_outputs)
        outputs[start:end] = batch_outputs
        labels[start:end] = batch_labels
        start = end
    outputs.flush()
    return torch.utils.data.TensorDataset(torch.from_numpy(outputs), torch.from_numpy(labels))


def run_inference(
    model: nn.Module,
    batches: Iterable,
    device: torch.device,
    desc: str = "predict",
    batch_size_key: str | None = None,
    precision: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """All of iter_inference at once: (outputs (N, ...) float32, labels (N,) int64).

    Used for logits (head, fine-tuned model) and for pooled features (a bare backbone).
    """
    outputs, labels = [], []
    for batch_outputs, batch_labels in iter_inference(
        model, batches, device, desc, batch_size_key, precision
    ):
        outputs.append(batch_outputs)
        labels.append(batch_labels)
    return np.concatenate(outputs), np.concatenate(labels)


def evaluate_loss_accuracy(
    model: nn.Module,
    batches: Iterable,
    device: torch.device,
    batch_size_key: str | None = None,
    precision: torch.dtype | None = None,
) -> tuple[float, float]:
    """(mean loss, accuracy) over the batches; under torchrun, over every rank's batches (a
    rank may have none)."""
    loss, correct, count = 0.0, 0.0, 0
    for logits, labels in iter_inference(
        model, batches, device, "validate", batch_size_key, precision
    ):
        loss += nn.functional.cross_entropy(
            torch.from_numpy(logits), torch.from_numpy(labels), reduction="sum"
        ).item()
        correct += float((logits.argmax(1) == labels).sum())
        count += len(labels)
    loss, correct, count = sum_over_ranks([loss, correct, count])
    return loss / count, correct / count


def fit_logreg(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    num_classes: int,
    seed: int,
    on_candidate: Callable[[dict[str, float]], None] | None = None,
) -> tuple[nn.Linear, dict[str, float]]:
    """Multinomial logistic regression with C chosen on the validation split, as a nn.Linear.

    Features are standardised for the solver, and the scaling is folded back into the weights
    (W' = W / sigma, b' = b - W' mu), so the returned layer takes raw features like any head.
    """
    from sklearn.linear_model import LogisticRegression

    mean = train_x.mean(0)
    std = train_x.std(0) + 1e-6
    scaled_train, scaled_val = (train_x - mean) / std, (val_x - mean) / std
    best = None
    for step, c in enumerate((0.001, 0.01, 0.1, 1.0, 10.0)):
        clf = LogisticRegression(C=c, max_iter=3000, random_state=seed)
        clf.fit(scaled_train, train_y)
        accuracy = float(clf.score(scaled_val, val_y))
        log.info("logreg C=%g: val accuracy %.4f", c, accuracy)
        if on_candidate is not None:
            on_candidate({"step": step, "C": c, "val_accuracy": accuracy})
        if best is None or accuracy > best[0]:
            best = (accuracy, c, clf)
    accuracy, c, clf = best
    if len(clf.classes_) != num_classes:
        raise ValueError(f"train split has {len(clf.classes_)} of {num_classes} classes")
    weight = clf.coef_ / std  # (C, D)
    bias = clf.intercept_ - weight @ mean
    head = nn.Linear(train_x.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight).float())
        head.bias.copy_(torch.from_numpy(bias).float())
    return head, {"C": c, "best_val_accuracy": accuracy}


def live_logger(live) -> Callable[[dict[str, float]], None]:
    """An on_epoch callback that logs one record per step to a DVCLive `Live`."""

    def on_epoch(record: dict[str, float]) -> None:
        for name, value in record.items():
            if name not in ("epoch", "step"):
                live.log_metric(name, value)
        live.next_step()

    return on_epoch
