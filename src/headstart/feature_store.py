"""Extract's use of the store (headstart.store): each image's features kept under a key that
covers everything that can change their bytes, so a grown dataset computes only its new images.

The key: the backbone's name and the sha256 of its weights, the input size and preprocessing,
the batch size (images are computed in full batches: see inference.iter_inference's pad_to),
the environment record (Python, torch, torchvision, timm, numpy, Pillow, CPU, its vector
instructions, threads, device, precision, processes), the model packages' versions and the
source of the modules that turn files into features. Batch invariance was measured on CPUs
(docs/cache.md): an image's features in a full batch do not depend on the other images in it
or its place. It is not measured on GPUs, so there the store is off, and under torchrun.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from headstart import store

if TYPE_CHECKING:
    from headstart.distributed import World
    from headstart.index import Images

log = logging.getLogger(__name__)

# Recorded packages that cannot change a feature's bytes: not in the key, so upgrading them
# keeps the store.
_NOT_FEATURE_PACKAGES = ("scikit-learn", "dvc")
# Packages holding model code (their weights are hashed anyway).
_MODEL_PACKAGES = ("efficientnet-lite-pytorch", "safetensors")
# Look-ups shown with a progress bar from this many images on.
_PROGRESS_FROM = 2000


def weights_digest(model: nn.Module) -> str:
    """The sha256 of a model's state (parameters and buffers: names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def store_key(meta: dict, backbone: nn.Module, batch_size: int) -> dict:
    """What a feature entry's bytes depend on, from the run's meta.json record (less the
    images and classes, which are per run, not per image)."""
    from headstart import (
        backbones,
        extraction,
        images,
        inference,
        loaders,
        timm_backbones,
        transforms,
    )
    from headstart.transforms import decode_size

    environment = dict(meta["environment"])
    environment["packages"] = {
        name: version
        for name, version in environment["packages"].items()
        if name not in _NOT_FEATURE_PACKAGES
    }
    return {
        "kind": "features",
        "backbone": meta["backbone"]["name"],
        "weights_sha256": weights_digest(backbone),
        **{
            name: meta[name]
            for name in ("image_size", "mean", "std", "interpolation", "crop_pct", "num_features")
        },
        "decode_size": decode_size(meta),
        "batch_size": batch_size,
        "environment": environment,
        "model_packages": {name: _version(name) for name in _MODEL_PACKAGES},
        "code": store.source_digest(
            sys.modules[__name__],
            extraction,
            images,
            transforms,
            loaders,
            backbones,
            timm_backbones,
            inference,
        ),
    }


def store_off_reason(device: torch.device, world: World) -> str | None:
    """Why the store cannot be used for this run, or None."""
    if world.size > 1:
        return "under torchrun (compute.nproc > 1) each process computes its own share"
    if device.type != "cpu":
        return f"on {device.type}, batch invariance is not measured"
    return None


def look_up(shelf: store.Shelf, images: Images, width: int) -> np.ndarray:
    """(N,) bool: which images have a whole, checked entry of `width` float32 features."""
    found = np.zeros(len(images), dtype=bool)
    quiet = len(images) < _PROGRESS_FROM
    names = tqdm(images.sha256, desc="store look-up", leave=False, disable=quiet)
    for position, name in enumerate(names):
        payload = shelf.get(name.decode())
        found[position] = payload is not None and len(payload) == 4 * width
    return found


def merged(
    images: Images,
    found: np.ndarray,
    computed: Iterable[tuple[np.ndarray, np.ndarray]],
    shelf: store.Shelf | None,
    width: int,
    batch_size: int,
    compute_one: Callable[[int], np.ndarray],
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(features (B, width) float32, labels (B,) int64) of `images` in order, `batch_size` at
    a time: found rows read from the store, the others taken in order from `computed` (the
    batches of the images not found, in order) and stored. A found entry that has gone (a
    prune or clear beside this run) is computed alone by `compute_one(position)`: the same
    bytes, since its batch is padded to full size. Memory stays one batch of each."""
    rows = (row for features, _ in computed for row in features)
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        block = np.empty((stop - start, width), dtype=np.float32)
        for position in range(start, stop):
            name = images.sha256[position].decode()
            if found[position]:
                payload = shelf.get(name, touch=False)  # touched by the look-up
                if payload is not None and len(payload) == 4 * width:
                    block[position - start] = np.frombuffer(payload, dtype=np.float32)
                    continue
                log.warning("store entry of %s gone during the run: computed again", name)
                block[position - start] = compute_one(position)
                continue
            block[position - start] = next(rows)
            if shelf is not None:
                shelf.put(name, block[position - start].tobytes())
        yield block, images.labels[start:stop]
    if next(rows, None) is not None:
        raise RuntimeError("more features computed than images missing from the store")
