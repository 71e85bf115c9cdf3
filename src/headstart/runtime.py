"""Where and how the work runs: device, autocast precision, CPU threads, seeds, and handing
freed memory back to the operating system.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import torch

from headstart.errors import ParamsError


def seed_everything(seed: int) -> torch.Generator:
    """The one place seeds are set; returns a generator for DataLoader shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(device: str, key: str = "compute.device") -> torch.device:
    """`compute.device` (or the option named `key`): auto is CUDA when present, else Apple's
    MPS, else the CPU. A device this machine lacks is refused, naming `key`."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(f"{key} is {device!r} but CUDA is not available here; use auto or cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ParamsError(f"{key} is 'mps' but MPS is not available here; use auto or cpu")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bfloat16 instructions (AVX512-BF16 or AMX), where bf16 pays off."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(
    precision: str, device: torch.device, training: bool = False
) -> torch.dtype | None:
    """The autocast dtype for `compute.precision` on `device`; None means plain float32.

    auto: on GPUs, bfloat16 where supported (else float16), for inference and training; on
    CPUs with native bfloat16, bfloat16 for inference only (extraction) and float32 for
    fine-tuning (`training`), where bfloat16 was not faster on a CPU (bench/precision.py);
    float32 everywhere else. Outputs written to disk (features, weights) stay float32.
    """
    if precision == "float32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        native = device.type == "cpu" and cpu_has_native_bf16()
        return torch.bfloat16 if native and not training else None
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[precision]


def precision_name(precision: torch.dtype | None) -> str:
    """How a resolved precision reads in logs and records: "float32" or "bfloat16 autocast"."""
    return "float32" if precision is None else f"{str(precision).removeprefix('torch.')} autocast"


def set_threads(threads: int | str) -> None:
    """`compute.threads`: an int pins torch's CPU thread count; auto keeps torch's default
    (one per physical core; under compute.nproc, each process's share, see distributed.relaunch).
    Results can differ in the last digits between thread counts."""
    if threads != "auto":
        torch.set_num_threads(threads)


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc's malloc_trim; a no-op
    elsewhere). Batch after batch, tensors of many sizes come and go, and glibc keeps what
    they freed scattered over its heaps, so without this a long extraction's peak memory
    creeps up with the number of batches (bench/scaling.py measures it)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc():
    """The C library when it has malloc_trim (glibc), else None; loaded on first use."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None
