"""Stage extract: run the frozen pretrained backbone once over every indexed image.

    python stages/extract.py DATA_DIR PREPARED_DIR FEATURES_DIR

Writes FEATURES_DIR/{train,val,test}_features.npy (N, D) float32 pooled pre-logits features,
FEATURES_DIR/{split}_labels.npy (N,) int64 class indices, and FEATURES_DIR/meta.json (backbone,
input size, preprocessing, classes, environment). Eval mode, inference mode, no augmentation;
autocast at compute.precision, features stored as float32. With compute.nproc > 1, runs as that
many processes under torchrun, each on its share of the batches; the files are the same, in
the same order. Reads params: backbone, compute.
"""

import argparse
import collections
import contextlib
import logging
import math
from pathlib import Path

import numpy as np

from headstart import distributed
from headstart.backbones import BACKBONES, build_backbone
from headstart.data import SPLITS, eval_transform, image_loader, load_prepared, resolve_image_size
from headstart.environment import describe
from headstart.io import ArrayWriter, atomic_dir, write_json
from headstart.model import precision_name, resolve_device, resolve_precision, set_threads
from headstart.params import as_dict, load_params
from headstart.stage import run
from headstart.train import iter_inference

log = logging.getLogger("headstart.extract")


def main(argv: list[str] | None = None) -> int | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("prepared_dir", type=Path)
    parser.add_argument("features_dir", type=Path)
    args = parser.parse_args(argv)
    params = load_params()
    prepared = load_prepared(args.data_dir, args.prepared_dir)
    if (code := distributed.relaunch(__file__, argv, params.compute.nproc)) is not None:
        return code

    spec = BACKBONES[params.backbone.name]
    size = resolve_image_size(params.backbone.image_size, spec, prepared.report)
    set_threads(params.compute.threads)
    with distributed.world(resolve_device(params.compute.device)) as (world, device):
        backbone = build_backbone(params.backbone.name, params.backbone.weights)
        precision = resolve_precision(params.compute.precision, device)
        transform = eval_transform(size, spec.mean, spec.std)
        log.info(
            "extracting %d images at %dx%d px on %s (%s)",
            len(prepared.images),
            size,
            size,
            device,
            precision_name(precision),
        )
        # Only rank 0 writes; with several processes the others send it their batches.
        with atomic_dir(args.features_dir) if world.is_main else contextlib.nullcontext() as out:
            for split in SPLITS:
                loader = image_loader(
                    args.data_dir,
                    prepared.split(split),
                    transform,
                    decode_size=size,
                    batch_size=params.compute.batch_size,
                    num_workers=params.compute.num_workers,
                    world=world,
                    pin_memory=device.type == "cuda",
                )
                rows = len(loader.dataset)
                batches = distributed.gather_in_order(
                    iter_inference(
                        backbone,
                        loader,
                        device,
                        desc=f"extract {split}",
                        batch_size_key="compute.batch_size",
                        precision=precision,
                    ),
                    world,
                    num_batches=math.ceil(rows / params.compute.batch_size),
                )
                if not world.is_main:
                    collections.deque(batches, maxlen=0)  # run and send this rank's share
                    continue
                # Streamed to disk batch by batch: memory does not grow with the number of images.
                with (
                    ArrayWriter(
                        out / f"{split}_features.npy", (rows, backbone.num_features), np.float32
                    ) as features,
                    ArrayWriter(out / f"{split}_labels.npy", (rows,), np.int64) as labels,
                ):
                    for batch_features, batch_labels in batches:
                        features.write(batch_features)
                        labels.write(batch_labels)
            if world.is_main:
                write_json(
                    out / "meta.json",
                    {
                        "backbone": as_dict(params.backbone),
                        "image_size": size,
                        "mean": list(spec.mean),
                        "std": list(spec.std),
                        "num_features": backbone.num_features,
                        "classes": prepared.classes,
                        "environment": describe(device, precision, world.size),
                    },
                )
    return None


if __name__ == "__main__":
    raise SystemExit(run(main))
