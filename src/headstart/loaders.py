"""Batches: image datasets and loaders, cached-tensor batches, and the samplers that make the
batch order a function of the seed alone, in one process or several.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms

from headstart.choices import SAMPLERS
from headstart.errors import ParamsError
from headstart.images import load_rgb
from headstart.transforms import split_normalization

if TYPE_CHECKING:  # loaders do not import distributed at run time
    from headstart.distributed import World
    from headstart.index import Images


class ImageDataset(Dataset):
    """(image tensor, label index) for paths relative to root; errors name the file.

    `decode_size`: the input size the transform resizes to; large JPEGs are decoded at reduced
    scale, never below it (images.decode_image's min_side). None: always a full decode.
    """

    def __init__(
        self,
        root: Path,
        paths: list[str],
        labels: Sequence[int] | np.ndarray,
        transform,
        decode_size: int | None = None,
    ):
        self.root = root
        self.paths = paths
        self.labels = labels
        self.transform = transform
        self.decode_size = decode_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        """`item`: an index, or (index, seed) from SeededOrder: the transform's random draws
        then come from that seed alone."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        path = self.root / self.paths[index]
        label = int(self.labels[index])  # a Python int: batches collate to int64
        try:
            image = load_rgb(path, self.decode_size)
            if seed is None:
                return self.transform(image), label
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.transform(image), label
        except Exception as error:  # re-raised with the file named, never swallowed
            raise RuntimeError(f"{path}: cannot decode or transform image: {error}") from error


def image_loader(
    root: Path,
    images: Images,
    transform,
    *,
    decode_size: int | None,
    batch_size: int,
    num_workers: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    world: World | None = None,
    pin_memory: bool = False,
    sampler: str = "shuffle",
) -> torch.utils.data.DataLoader:
    """Batches of (images (B, 3, S, S), labels (B,) int64) for `images`, in their order unless
    shuffled; workers seeded. `decode_size` is the transform's input size S (see ImageDataset);
    `shuffle`, `generator`, `world` and `sampler` as in `sampling`; `pin_memory` for fast
    copies to a GPU.
    """
    per_image, batch_normalize = split_normalization(transform)
    dataset = ImageDataset(root, images.paths, images.labels, per_image, decode_size)
    loader = torch.utils.data.DataLoader if batch_normalize is None else _NormalizingLoader
    options = {} if batch_normalize is None else {"normalize": batch_normalize}
    return loader(
        dataset,
        num_workers=num_workers,
        worker_init_fn=_seed_worker,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        **sampling(dataset, batch_size, shuffle, generator, world, sampler, images.labels),
        **options,
    )


class _NormalizingLoader(torch.utils.data.DataLoader):
    """A DataLoader whose dataset gives uint8 images: batches come out as ToTensor + `normalize`
    would have made each image (see transforms.split_normalization)."""

    def __init__(self, *args, normalize: transforms.Normalize, pin_memory: bool, **kwargs):
        # The uint8 batches are not pinned: only the float batches made from them are copied
        # to a GPU.
        super().__init__(*args, pin_memory=False, **kwargs)
        self.pin_batches = pin_memory
        self.mean = torch.as_tensor(normalize.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(normalize.std, dtype=torch.float32).view(-1, 1, 1)

    def __iter__(self) -> Iterator:
        for images, labels in super().__iter__():
            # ToTensor: float32 / 255; Normalize: (x - mean) / std, channel by channel.
            pixels = images.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)
            yield (pixels.pin_memory() if self.pin_batches else pixels), labels


def sampling(
    dataset,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    world: World | None = None,
    sampler: str = "shuffle",
    labels: Sequence[int] | np.ndarray | None = None,
) -> dict[str, Any]:
    """DataLoader arguments (sampler, batch size, generator) that make the batch order a
    function of `generator` alone, and share the batches among the processes of `world`.

    The shuffle draws one permutation per epoch from `generator`, and nothing else does: a
    DataLoader also draws a seed from its own generator (or torch's global one) whenever it
    starts an iterator, which happens once for persistent worker processes but every epoch
    for in-process loading, and would shift both the order and the global random stream
    (dropout, stochastic depth). So the loader gets a private generator, seeded from
    `generator`'s seed without consuming it: images from files and cached tensors are then
    visited in the same order, and training draws the same random numbers. A shuffled image
    dataset also gets a seed per image and epoch (SeededOrder) for its augmentation.

    With several processes (`world`: this process's distributed.World; None: one process), a
    shuffled loader (training) deals every global batch out among
    them (`DealtBatches`, batches of batch_size / world.size), an unshuffled one (inference)
    gives each process whole batches (`WholeBatches`), gathered back in order by
    distributed.gather_in_order.

    `sampler: balanced` (shuffled loaders only; `labels`: each item's class) draws the epoch's
    items with replacement, each with probability 1 / (classes x its class's count): every
    class equally often on average, as many items an epoch as `shuffle` visits, drawn from
    `generator` alone, so they are the same in any number of processes.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    seed = generator.initial_seed() if generator is not None else 0
    order = None
    if shuffle and sampler == "balanced":
        order = balanced_order(labels, generator)
    elif shuffle:
        order = torch.utils.data.RandomSampler(dataset, generator=generator)
    if shuffle and isinstance(dataset, ImageDataset):
        order = SeededOrder(order, seed)  # augmentation independent of workers and processes
    rank = world.rank if world is not None else 0
    if world is not None and world.size > 1:
        if shuffle:
            order = DealtBatches(order, batch_size, world)
            batch_size //= world.size
        else:
            order = WholeBatches(len(dataset), batch_size, world)
    # Each rank's worker processes draw their own augmentations (rank 0's are one process's).
    loader_generator = torch.Generator().manual_seed(seed + rank)
    return {"sampler": order, "batch_size": batch_size, "generator": loader_generator}


def balanced_order(labels, generator: torch.Generator | None) -> torch.utils.data.Sampler:
    """A WeightedRandomSampler drawing len(labels) items an epoch, each class equally likely."""
    if labels is None:
        raise ValueError("sampler balanced needs the items' labels")
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    counts = torch.bincount(labels).to(torch.float64)
    weights = 1.0 / counts[labels]
    return torch.utils.data.WeightedRandomSampler(
        weights, len(labels), replacement=True, generator=generator
    )


class SeededOrder(torch.utils.data.Sampler):
    """`order`'s indices paired with a seed each, (index, seed), for ImageDataset: an image's
    augmentation then depends on the seed, the epoch and the image alone, not on which loader
    worker or which process (compute.num_workers, compute.nproc) transforms it. The seeds come
    from a generator of their own, so the order's generator draws what it would without them.
    An image drawn twice in one epoch (sampler balanced) gets a new seed each time.
    """

    def __init__(self, order, seed: int):
        self.order = order
        self.seeds = torch.Generator().manual_seed(seed + 0x5EED)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = int(torch.randint(0, 2**62, (1,), generator=self.seeds))
        drawn: dict[int, int] = {}  # times each index came before, this epoch
        size = len(self.order)
        for index in self.order:
            index = int(index)
            repeat = drawn.get(index, 0)
            drawn[index] = repeat + 1
            yield index, epoch + index + repeat * size

    def __len__(self) -> int:
        return len(self.order)


class WholeBatches(torch.utils.data.Sampler):
    """Inference with several processes: the single-process batches (consecutive items,
    `batch_size` each), batch k to rank k % size. Batched by `batch_size` again, a rank's
    share falls into exactly those batches (only the very last batch can be short)."""

    def __init__(self, num_items: int, batch_size: int, world: World):
        self.num_items, self.batch_size, self.world = num_items, batch_size, world

    def __iter__(self) -> Iterator[int]:
        starts = range(0, self.num_items, self.batch_size)[self.world.rank :: self.world.size]
        for start in starts:
            yield from range(start, min(start + self.batch_size, self.num_items))

    def __len__(self) -> int:
        num_batches = -(-self.num_items // self.batch_size)
        mine = range(self.world.rank, num_batches, self.world.size)
        short = num_batches * self.batch_size - self.num_items  # missing from the last batch
        return len(mine) * self.batch_size - (short if num_batches - 1 in mine else 0)


class DealtBatches(torch.utils.data.Sampler):
    """Training with several processes (DistributedDataParallel): the single-process order
    (`order`, reshuffled every epoch) cut into global batches of `batch_size`, each dealt out
    one item per rank in turn, so rank r's k-th batch is items r, r + size, ... of global batch
    k; with DDP averaging the gradients, a step is the single-process step. Every rank must
    take the same number of steps: a last global batch with fewer items than ranks is left out
    (at most size - 1 items an epoch)."""

    def __init__(self, order, batch_size: int, world: World):
        if batch_size % world.size:
            raise ParamsError(
                f"a batch of {batch_size} does not split evenly over {world.size} processes; "
                "make finetune.batch_size a multiple of compute.nproc"
            )
        self.order, self.batch_size, self.world = order, batch_size, world

    def __iter__(self) -> Iterator[int]:
        order = list(self.order)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) >= self.world.size:
                yield from batch[self.world.rank :: self.world.size]

    def __len__(self) -> int:
        full, rest = divmod(len(self.order), self.batch_size)
        share = full * (self.batch_size // self.world.size)
        if rest >= self.world.size:
            share += len(range(self.world.rank, rest, self.world.size))
        return share


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow it.
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


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
