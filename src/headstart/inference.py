"""Inference over batches: a model in eval mode, outputs streamed batch by batch.

Forward passes run under autocast when given a `precision` dtype (see runtime.resolve_precision),
and image batches in channels-last memory format, which oneDNN and cuDNN convolutions prefer;
outputs are returned in float32. Running out of memory (CUDA, or the CPU allocator) raises
`OutOfMemory`, whose one-line message names the params key of the batch size to lower.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from headstart.choices import TTA
from headstart.distributed import SINGLE, World, gather_in_order, is_main_process, sum_over_ranks
from headstart.errors import OutOfMemory
from headstart.io import open_array
from headstart.runtime import release_freed_memory

# Said when the caller did not name its batch size key: the keys that set batch sizes.
_BATCH_SIZE_KEYS = "head.batch_size, finetune.batch_size or inference.batch_size"


def _is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or a RuntimeError from another allocator that says so."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    # CPU: "DefaultCPUAllocator: can't allocate memory: ..."; MPS: "MPS backend out of memory".
    message = str(error).lower()
    return "out of memory" in message or "can't allocate memory" in message


@contextlib.contextmanager
def explain_out_of_memory(
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


def autocast(device: torch.device, precision: torch.dtype | None):
    return torch.autocast(device.type, dtype=precision, enabled=precision is not None)


def to_device(inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Images (4-d batches) go channels-last; feature batches as they are."""
    if inputs.ndim == 4:
        return inputs.to(device, memory_format=torch.channels_last, non_blocking=True)
    return inputs.to(device, non_blocking=True)


def iter_inference(
    model: nn.Module,
    batches: Iterable,
    device: torch.device,
    desc: str = "predict",
    batch_size_key: str | None = None,
    precision: torch.dtype | None = None,
    pad_to: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Run `model` in eval mode over the batches; yield (outputs (B, ...) float32, labels (B,)
    int64) per batch, so a caller can stream them to disk.

    `batch_size_key` is named in the OutOfMemory error, `precision` is the autocast dtype, as
    in fit. `pad_to`: a shorter batch is padded with zeros to this many items and only its own
    outputs kept: on a CPU an image's outputs then never depend on the size of its batch
    (oneDNN picks kernels by batch size), only on its own pixels (docs/cache.md).
    """
    model.eval().to(device, memory_format=torch.channels_last)
    with explain_out_of_memory(desc, device, batches, batch_size_key):
        progress = tqdm(batches, desc=desc, leave=False, disable=not is_main_process())
        for number, (inputs, targets) in enumerate(progress, start=1):
            count = len(inputs)
            if pad_to is not None and count < pad_to:
                padding = inputs.new_zeros((pad_to - count, *inputs.shape[1:]))
                inputs = torch.cat([inputs, padding])
            with torch.inference_mode(), autocast(device, precision):
                outputs = model(to_device(inputs, device))[:count].float().cpu()
            yield outputs.numpy(), torch.as_tensor(targets).numpy().astype(np.int64)
            if number % 16 == 0:
                release_freed_memory()


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


class FlipTTA(nn.Module):
    """Test-time augmentation by mirroring: the mean of the logits of each image and of its
    horizontal mirror. Wraps a classifier on normalised image batches (B, 3, H, W); flipping
    the width axis of the normalised batch is normalising the mirror, since the mean and std
    are per channel. Sound only where a mirrored image is of the same class (not digits or
    text)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.model(images) + self.model(images.flip(3))) / 2  # (B, num_classes)


# evaluate.tta and predict --tta: test-time augmentation name -> wrapper of a classifier on
# image batches. The head on cached features cannot use it: a feature vector has no mirror.
TTA_WRAPPERS = {"none": lambda model: model, "flip": FlipTTA}


def with_tta(model: nn.Module, tta: str) -> nn.Module:
    """`model` with the named test-time augmentation (TTA); "none" returns it unchanged."""
    if tta not in TTA_WRAPPERS:
        raise ValueError(f"test-time augmentation {tta!r}: expected one of {', '.join(TTA)}")
    return TTA_WRAPPERS[tta](model)


def validation_scores(
    model: nn.Module,
    batches: Iterable,
    device: torch.device,
    batch_size_key: str | None = None,
    precision: torch.dtype | None = None,
    desc: str = "validate",
) -> dict[str, float]:
    """Mean loss, accuracy, balanced accuracy and macro-F1 over the batches, as
    scikit-learn's accuracy_score, balanced_accuracy_score (mean recall of the classes
    present) and f1_score(average="macro", zero_division=0) over every class would give them;
    under torchrun, over every rank's batches (a rank may have none), from the summed
    confusion matrix. `desc` names the pass in its progress bar and errors."""
    loss, counts = 0.0, None
    for logits, labels in iter_inference(model, batches, device, desc, batch_size_key, precision):
        loss += nn.functional.cross_entropy(
            torch.from_numpy(logits), torch.from_numpy(labels), reduction="sum"
        ).item()
        if counts is None:
            counts = np.zeros((logits.shape[1], logits.shape[1]), dtype=np.float64)
        np.add.at(counts, (labels, logits.argmax(1)), 1.0)
    # A rank without batches (torchrun, a short split) learns the class count from the others.
    mine = [0.0, 0.0] if counts is None else [float(len(counts)), 1.0]
    class_total, ranks_with_batches = sum_over_ranks(mine)
    classes = int(round(class_total / ranks_with_batches))
    if counts is None:
        counts = np.zeros((classes, classes))
    *totals, loss = sum_over_ranks([*counts.ravel().tolist(), loss])
    confusion = np.asarray(totals).reshape(classes, classes)
    return {"loss": loss / confusion.sum(), **_confusion_scores(confusion)}


def _confusion_scores(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1 of a (true, predicted) count matrix."""
    true_positive = np.diag(confusion)
    support, predicted = confusion.sum(1), confusion.sum(0)
    present = support > 0
    recall = true_positive[present] / support[present]
    f1_denominator = support + predicted  # 2 TP + FP + FN
    f1 = np.zeros_like(true_positive)
    np.divide(2 * true_positive, f1_denominator, out=f1, where=f1_denominator > 0)
    return {
        "accuracy": float(true_positive.sum() / confusion.sum()),
        "balanced_accuracy": float(recall.mean()),
        "macro_f1": float(f1.mean()),
    }


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
