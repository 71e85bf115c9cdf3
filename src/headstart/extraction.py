"""Extraction: the frozen pretrained backbone run once over every indexed image, its pooled
features streamed to disk split by split.

Eval mode, inference mode, no augmentation; autocast at compute.precision, features stored as
float32. Under torchrun each process runs its share of the batches and rank 0 writes every
file, in the same order as one process.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from headstart import distributed
from headstart.backbones import BACKBONES, build_backbone
from headstart.environment import describe
from headstart.folders import SPLITS
from headstart.inference import iter_inference
from headstart.io import ArrayWriter, atomic_dir, sha256_file, write_json
from headstart.loaders import image_loader
from headstart.runtime import precision_name, resolve_device, resolve_precision, set_threads
from headstart.transforms import eval_transform, resolve_image_size

if TYPE_CHECKING:
    from headstart.index import PreparedData
    from headstart.params import BackboneParams, ComputeParams, InferenceParams

log = logging.getLogger(__name__)


def extract_features(
    prepared: PreparedData,
    backbone_params: BackboneParams,
    compute: ComputeParams,
    inference: InferenceParams,
    features_dir: Path,
) -> None:
    """Write features_dir/{split}_features.npy (N, D) float32, {split}_labels.npy (N,) int64
    and meta.json (backbone, input size, preprocessing, classes, environment), atomically."""
    from headstart.params import as_dict

    spec = BACKBONES[backbone_params.name]
    size = resolve_image_size(backbone_params.image_size, spec, prepared.report)
    batch_size = inference.batch_size
    set_threads(compute.threads)
    with distributed.world(resolve_device(compute.device)) as (world, device):
        backbone = build_backbone(backbone_params.name, backbone_params.weights)
        precision = resolve_precision(compute.precision, device)
        log.info(
            "extracting %d images at %dx%d px on %s (%s)",
            len(prepared.images),
            size,
            size,
            device,
            precision_name(precision),
        )
        # One pass over all the splits: one set of loader processes to start and one pipeline
        # to fill and drain, instead of one per split.
        images, parts = prepared.images.in_split_order()
        loader = image_loader(
            prepared.root,
            images,
            eval_transform(size, spec.mean, spec.std),
            decode_size=size,
            batch_size=batch_size,
            num_workers=compute.num_workers,
            world=world,
            pin_memory=device.type == "cuda",
        )
        batches = distributed.gather_in_order(
            iter_inference(
                backbone,
                loader,
                device,
                desc="extract",
                batch_size_key="inference.batch_size",
                precision=precision,
            ),
            world,
            num_batches=math.ceil(len(images) / batch_size),
        )
        # Only rank 0 writes; with several processes the others send it their batches.
        with atomic_dir(features_dir) if world.is_main else contextlib.nullcontext() as out:
            if not world.is_main:
                collections.deque(batches, maxlen=0)  # run and send this rank's share
                return
            write_by_split(batches, out, parts, backbone.num_features)
            # Each file's sha256, which every reader checks: DVC trusts its own cache, so a byte
            # flipped there would otherwise be consumed without a word.
            files = {path.name: sha256_file(path) for path in sorted(out.glob("*.npy"))}
            write_json(
                out / "meta.json",
                {
                    "backbone": as_dict(backbone_params),
                    "image_size": size,
                    "mean": list(spec.mean),
                    "std": list(spec.std),
                    "num_features": backbone.num_features,
                    "classes": prepared.classes,
                    "environment": describe(device, precision, world.size),
                    "files": files,
                },
            )


def write_by_split(
    batches: Iterable[tuple[np.ndarray, np.ndarray]], out: Path, parts: list[slice], width: int
) -> None:
    """Stream (features, labels) batches of the images in split order to each split's files:
    `parts` are the splits' rows (Images.in_split_order), and a batch that straddles two
    splits is cut at the boundary. Memory stays one batch, however many images."""
    with contextlib.ExitStack() as files:
        writers = [
            (
                files.enter_context(
                    ArrayWriter(out / f"{split}_features.npy", (count, width), np.float32)
                ),
                files.enter_context(ArrayWriter(out / f"{split}_labels.npy", (count,), np.int64)),
            )
            for split, count in zip(SPLITS, (p.stop - p.start for p in parts), strict=True)
        ]
        first = 0  # the row of the batch's first image among all the images
        for batch_features, batch_labels in batches:
            last = first + len(batch_labels)
            for (features, labels), part in zip(writers, parts, strict=True):
                start, stop = max(part.start, first) - first, min(part.stop, last) - first
                if start < stop:
                    features.write(batch_features[start:stop])
                    labels.write(batch_labels[start:stop])
            first = last
