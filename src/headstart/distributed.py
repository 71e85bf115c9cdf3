"""Several processes on one or more machines: PyTorch distributed, launched with torchrun.

`compute.nproc: N` (N > 1) makes extract and finetune rerun themselves as
`python -m torch.distributed.run --standalone --nproc_per_node N <stage> <args>` (torchrun),
so dvc.yaml keeps one command per stage; launching a stage with torchrun yourself (several
machines: `--nnodes`) works too. Each process is a rank; rank 0 alone writes outputs.

How the work is shared, so that the outputs equal a single process's:
- Inference (extraction, validation, cached activations): the single-process batches, dealt out
  whole, batch k to rank k % N; results are gathered back in batch order (`gather_in_order`).
  Every batch holds the same images as in one process, so features match it (exactly, with the
  same thread count per process; within float rounding otherwise).
- Training: DistributedDataParallel. Each global batch of `finetune.batch_size` images (the
  same batches, in the same order, as one process draws) is dealt out one image per rank in
  turn (`DealtBatches`); DDP averages the gradients, which is the single-process step.

Backends: NCCL between GPUs (one per process, cuda:LOCAL_RANK), gloo on CPUs. Python objects
(feature batches) always travel over gloo.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from headstart.errors import ParamsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run."""

    rank: int = 0  # 0 .. size - 1; rank 0 writes the outputs
    size: int = 1
    local_rank: int = 0  # on this machine: which GPU this process uses
    local_size: int = 1
    objects: Any = None  # the process group for Python objects (gloo); None: the default one

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def launched() -> bool:
    """True in a process started by torchrun (which sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    """False in torchrun's ranks other than 0: they show no progress bars and log only warnings."""
    return int(os.environ.get("RANK", "0")) == 0


def relaunch(script: str, argv: list[str] | None, nproc: int) -> int | None:
    """Run `script argv` as `nproc` processes under torchrun and return its exit code; None
    when there is nothing to do (nproc 1, or already under torchrun).

    With `compute.threads: auto`, each process gets its share of this machine's CPU threads
    (torchrun would give each one thread). A SIGINT reaches every process from the terminal; a
    SIGTERM is passed on to torchrun, which stops the processes.
    """
    if nproc <= 1 or launched():
        return None
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        script,
        *(sys.argv[1:] if argv is None else argv),
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, torch.get_num_threads() // nproc)))
    log.info("compute.nproc %d: %s", nproc, shlex.join(command))
    process = subprocess.Popen(command, env=env)
    try:
        code = process.wait()
    except BaseException:  # KeyboardInterrupt or stage.Interrupted: stop the processes first
        process.send_signal(signal.SIGTERM)
        process.wait()
        raise
    if code != 0:
        log.error("%d processes under torchrun: exit code %d (the errors are above)", nproc, code)
    return code


@contextlib.contextmanager
def world(device: torch.device) -> Iterator[tuple[World, torch.device]]:
    """Join the process group when started by torchrun; yield (this process's World, the
    device it computes on). A single process gets (SINGLE, device) and nothing else happens."""
    if not launched():
        yield SINGLE, device
        return
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda":
        if device.index is not None and size > 1:
            raise ParamsError(
                f"compute.device is {device} but {size} processes each need a GPU of their own; "
                "use compute.device: cuda (process k takes GPU k on its machine)"
            )
        if local_size > torch.cuda.device_count():
            raise ParamsError(
                f"compute.nproc: {local_size} processes on this machine but only "
                f"{torch.cuda.device_count()} GPUs; lower compute.nproc"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        objects = dist.new_group(backend="gloo") if backend == "nccl" else None
        if rank == 0:
            log.info("%d processes (%s), this one on %s", size, backend, device)
        yield World(rank, size, local_rank, local_size, objects), device
    finally:
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier(group=world.objects)


def gather_in_order(
    results: Iterable[Any], world: World, num_batches: int, everywhere: bool = False
) -> Iterator[Any]:
    """Every rank's per-batch results, in the single-process batch order.

    `results` are this rank's, for batches rank, rank + size, ... of `num_batches` (see
    data.WholeBatches). Rank 0 yields all of them, the other ranks none (`everywhere`: every
    rank yields all). One batch per rank travels at a time, so memory stays a few batches.
    """
    if world.size == 1:
        yield from results
        return
    mine = iter(results)
    for step in range(math.ceil(num_batches / world.size)):
        batch = step * world.size + world.rank
        item = next(mine) if batch < num_batches else None
        gathered = [None] * world.size
        if everywhere:
            dist.all_gather_object(gathered, item, group=world.objects)
        else:
            dist.gather_object(item, gathered if world.is_main else None, 0, group=world.objects)
        if everywhere or world.is_main:
            yield from (g for g in gathered if g is not None)


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sums over all processes (float64); the values themselves in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def batch_share(count: int) -> float:
    """This rank's `count` items as a share of the global batch, times the number of ranks:
    1.0 when every rank has as many items (and in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 1.0
    return count * dist.get_world_size() / sum_over_ranks([count])[0]


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` wrapped in DistributedDataParallel inside a process group, else `model`.

    The wrapper is for training steps only: its forward synchronises gradients. Weights, state
    dicts and evaluation use the unwrapped `model` (identical on every rank).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
