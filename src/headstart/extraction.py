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
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from headstart import distributed, feature_store, store
from headstart.backbones import backbone_spec, build_backbone
from headstart.environment import describe
from headstart.folders import SPLITS
from headstart.inference import iter_inference
from headstart.io import ArrayWriter, atomic_dir, read_json, sha256_file, write_json
from headstart.loaders import image_loader
from headstart.runtime import precision_name, resolve_device, resolve_precision, set_threads
from headstart.transforms import decode_size, eval_transform, preprocessing, resolve_image_size

if TYPE_CHECKING:
    from headstart.index import Images, PreparedData
    from headstart.params import BackboneParams, ComputeParams, InferenceParams

log = logging.getLogger(__name__)


def extract_features(
    prepared: PreparedData,
    backbone_params: BackboneParams,
    compute: ComputeParams,
    inference: InferenceParams,
    features_dir: Path,
    reuse_from: Path | None = None,
) -> dict[str, float] | None:
    """Write features_dir/{split}_features.npy (N, D) float32, {split}_labels.npy (N,) int64
    and meta.json (backbone, input size, preprocessing, classes, environment), atomically.

    `reuse_from`: a folder of earlier extractions (the leaderboard's, data/compare/<name>);
    one whose meta.json equals what this run would write (same backbone and weights, size,
    images, environment) and whose files check out is copied instead of recomputed: the same
    bytes this run would produce. Returns the timing on rank 0 (images, seconds, images/s;
    for the leaderboard), None on the other ranks.
    """
    from headstart.params import as_dict

    spec = backbone_spec(backbone_params.name)
    size = resolve_image_size(backbone_params.image_size, spec, prepared.report)
    batch_size = inference.batch_size
    set_threads(compute.threads)
    with distributed.world(resolve_device(compute.device)) as (world, device):
        backbone = build_backbone(backbone_params.name, backbone_params.weights)
        precision = resolve_precision(compute.precision, device)
        meta = {
            "backbone": as_dict(backbone_params),
            "image_size": size,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "interpolation": spec.interpolation,
            "crop_pct": spec.crop_pct,
            "num_features": backbone.num_features,
            "parameters": sum(p.numel() for p in backbone.parameters()),
            "classes": prepared.classes,
            "images": prepared.fingerprint,
            "environment": describe(device, precision, world.size),
        }
        source = _reusable(reuse_from, meta) if reuse_from and world.size == 1 else None
        if source is not None:
            log.info("features of %s found in %s: copied, not recomputed", spec.name, source)
            with atomic_dir(features_dir) as out:
                for name in [*meta_files(source), "meta.json"]:
                    shutil.copyfile(source / name, out / name)
            return {"images": len(prepared.images), "seconds": 0.0, "images_per_second": 0.0}
        images, parts = prepared.images.in_split_order()
        shelf, found = None, np.zeros(len(images), dtype=bool)
        off = feature_store.store_off_reason(device, world)
        if off is not None:
            log.info("feature store off: %s", off)
        else:
            key = feature_store.store_key(meta, backbone, batch_size)
            shelf = store.open_shelf("features", key, prepared.root)
            if shelf is not None:
                found = feature_store.look_up(shelf, images, backbone.num_features)
        missing = images.subset(~found)
        log.info(
            "extracting %d images at %dx%d px on %s (%s): %d found in the feature store, "
            "%d to compute",
            len(images),
            size,
            size,
            device,
            precision_name(precision),
            int(found.sum()),
            len(missing),
        )

        def run_backbone(which: Images, desc: str = "extract") -> Iterator:
            # One pass over all the splits: one set of loader processes to start and one
            # pipeline to fill and drain, instead of one per split. Every batch is computed
            # full (padded): an image's features never depend on how many share its batch.
            loader = image_loader(
                prepared.root,
                which,
                eval_transform(**preprocessing(meta)),
                decode_size=decode_size(meta),
                batch_size=batch_size,
                num_workers=compute.num_workers if len(which) > batch_size else 0,
                world=world,
                pin_memory=device.type == "cuda",
            )
            return iter_inference(
                backbone,
                loader,
                device,
                desc=desc,
                batch_size_key="inference.batch_size",
                precision=precision,
                pad_to=batch_size,
            )

        if world.size > 1:
            batches = distributed.gather_in_order(
                run_backbone(images), world, num_batches=math.ceil(len(images) / batch_size)
            )
        else:
            batches = feature_store.merged(
                images,
                found,
                run_backbone(missing) if len(missing) else iter(()),
                shelf,
                backbone.num_features,
                batch_size,
                lambda at: next(run_backbone(images.subset([at]), "extract again"))[0][0],
            )
        start = time.perf_counter()
        # Only rank 0 writes; with several processes the others send it their batches.
        with atomic_dir(features_dir) if world.is_main else contextlib.nullcontext() as out:
            if not world.is_main:
                collections.deque(batches, maxlen=0)  # run and send this rank's share
                return None
            write_by_split(batches, out, parts, backbone.num_features)
            seconds = time.perf_counter() - start
            # Each file's sha256, which every reader checks: DVC trusts its own cache, so a byte
            # flipped there would otherwise be consumed without a word.
            files = {path.name: sha256_file(path) for path in sorted(out.glob("*.npy"))}
            write_json(out / "meta.json", {**meta, "files": files})
    computed = len(missing)
    rate = computed / seconds if seconds > 0 and computed else 0.0
    if shelf is not None:
        if computed >= batch_size:  # the backbone's speed here, for a run that computes little
            shelf.describe({**key, "images_per_second": round(rate)})
        elif not computed:
            rate = float(store.read_description(shelf).get("images_per_second", 0.0))
        if shelf.written:
            store.prune_quietly()
    log.info(
        "extracted %d images in %.1f s: %d from the feature store, %d computed (%.1f images/s)",
        len(images),
        seconds,
        len(images) - computed,
        computed,
        rate,
    )
    return {"images": len(images), "seconds": round(seconds, 3), "images_per_second": round(rate)}


def meta_files(folder: Path) -> list[str]:
    """The array files a features folder's meta.json lists."""
    files = read_json(folder / "meta.json").get("files")
    return sorted(files) if isinstance(files, dict) else []


def _reusable(folders: Path, meta: dict) -> Path | None:
    """The folder under `folders` whose meta.json, less its file hashes, equals `meta` and
    whose files match those hashes; None when there is none."""
    if not folders.is_dir():
        return None
    for found in sorted(folders.rglob("meta.json")):
        try:
            recorded = read_json(found)
        except (OSError, ValueError):
            continue
        if not isinstance(recorded, dict) or {**recorded, "files": None} != {**meta, "files": None}:
            continue
        files = recorded.get("files") or {}
        if files and all(
            (found.parent / name).is_file() and sha256_file(found.parent / name) == digest
            for name, digest in files.items()
        ):
            return found.parent
    return None


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
