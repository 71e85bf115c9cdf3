"""Extraction at the model's speed: the extract stage's images/s versus the bare forward pass.

For each input size and precision, side by side in one process:
- model: the backbone's forward pass over ready-made tensors of the same batch and size (the
  ceiling: no decoding, no resizing);
- extract: what the extract stage runs, files to features (decode, resize, crop, normalise in
  `compute.num_workers` loader processes, forward pass, features out);
- full decode: the same, but every JPEG decoded at full size (no reduced-scale decoding);
- per-image normalise: the same, but the workers convert and normalise each image and send
  float32 (the loader otherwise sends uint8 and normalises whole batches).
The ratio extract/model says whether decoding is the bottleneck (target: 0.8 or more).
- decode only: the loader alone (decode, resize, crop, no model; starting its processes
  included, as in extract), D images/s. Where the loader workers and the model share the same
  cores, an image costs 1/D + 1/M core-time, so the best ratio extract can reach is
  D / (D + M): the `ceiling` column.
Images are generated JPEGs (bench/synthetic.py), 400x300 by default, like photos, or those of
an existing ImageFolder (--data).
Every figure is the median over --rounds (default 3) rounds, each of which runs every
measurement once in turn: the machine's speed drifts over minutes, and it then moves the model
and the loaders alike instead of the ratio.

    python bench/extract_speed.py                       # 512 images, 224 and 96 px
    python bench/extract_speed.py --images 1024 --sizes 224 --precisions auto
    python bench/extract_speed.py --photo-size 1600 1200   # camera-sized photos
    python bench/extract_speed.py --data data/digits --sizes 96   # the built-in digits
    python bench/extract_speed.py --workers 0 2         # decoding in the main process or not

Reads inference.batch_size, compute.num_workers (unless --workers) and backbone.name from
params.yaml. The last line is the ratio for the default backbone at 224 px (or else the first
size) with precision auto and the first --workers.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from synthetic import make_photos
from torchvision.transforms import Compose

from headstart.backbones import backbone_spec, build_backbone
from headstart.images import IMAGE_EXTENSIONS
from headstart.index import Images
from headstart.inference import iter_inference
from headstart.loaders import image_loader
from headstart.params import load_params
from headstart.runtime import precision_name, resolve_precision, set_threads
from headstart.transforms import eval_transform


def images_per_second(batches, count: int, backbone, precision) -> float:
    device = torch.device("cpu")
    start = time.perf_counter()
    seen = sum(len(f) for f, _ in iter_inference(backbone, batches, device, precision=precision))
    elapsed = time.perf_counter() - start
    assert seen == count, (seen, count)
    return count / elapsed


def loader_speed(folder, images, transform, size, batch_size, workers) -> float:
    """Images/s of the extract stage's loader alone: decoding, resizing, no model."""
    loader = image_loader(
        folder, images, transform, decode_size=size, batch_size=batch_size, num_workers=workers
    )
    start = time.perf_counter()
    seen = sum(len(labels) for _, labels in loader)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images", type=int, help="how many (default: 512 generated, or all of --data)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 96])
    parser.add_argument("--precisions", nargs="+", default=["float32", "auto"])
    parser.add_argument("--photo-size", type=int, nargs=2, default=[400, 300], metavar=("W", "H"))
    parser.add_argument("--folder", type=Path, help="reuse generated images here")
    parser.add_argument(
        "--data", type=Path, help="an existing ImageFolder instead of generated photos"
    )
    parser.add_argument(
        "--workers", type=int, nargs="+", help="loader processes to try (default: params')"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating measurements; medians are shown"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    params = load_params()
    set_threads(params.compute.threads)
    name = params.backbone.name
    spec = backbone_spec(name)
    backbone = build_backbone(name, params.backbone.weights)
    batch_size = params.inference.batch_size
    args.workers = args.workers or [params.compute.num_workers]

    if args.data:
        folder, kind = args.data, f"images of {args.data}"
    else:
        folder = args.folder or Path(tempfile.mkdtemp(prefix="headstart-bench-"))
        make_photos(folder, args.images or 512, size=tuple(args.photo_size))
        kind = f"JPEGs {args.photo_size[0]}x{args.photo_size[1]}"
    paths = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
    )
    paths = paths[: args.images]
    classes = sorted({p.split("/")[0] for p in paths})
    images = Images(  # splits and digests are not read here: placeholders of the right type
        paths,
        np.array([classes.index(p.split("/")[0]) for p in paths], dtype=np.int64),
        np.zeros(len(paths), dtype=np.int8),
        np.zeros(len(paths), dtype="S64"),
    )
    print(
        f"{name}, {len(images)} {kind}, batch {batch_size}, {torch.get_num_threads()} torch threads"
    )
    print(
        f"{'size':>5} {'precision':<25} {'workers':>7} {'model img/s':>12} {'extract img/s':>14} "
        f"{'full decode':>12} {'per-image norm':>15} {'decode only':>12} {'ceiling':>8} "
        f"{'ratio':>6}"
    )
    results = {}
    for size in args.sizes:
        ready = [
            (torch.randn(min(batch_size, len(images) - i), 3, size, size), torch.zeros(1))
            for i in range(0, len(images), batch_size)
        ]
        transform = eval_transform(size, spec.mean, spec.std, spec.interpolation, spec.crop_pct)
        # Wrapped in a Compose of its own, the loader cannot split off the normalisation.
        variants = {
            "extract": (transform, size),
            "full decode": (transform, None),
            "per-image norm": (Compose([transform]), size),
        }
        loader_speed(folder, images, transform, size, batch_size, 0)  # warms the file cache
        for wanted in args.precisions:
            precision = resolve_precision(wanted, torch.device("cpu"))
            images_per_second(ready[:1], len(ready[0][0]), backbone, precision)  # warm-up
            for workers in args.workers:
                # Rounds alternate every measurement, and each figure is the median over the
                # rounds: the machine's speed drifts over minutes, and a model measured
                # minutes before the loaders made the ratio swing by 0.1 and more.
                runs = {name: [] for name in ("model", *variants, "decode only")}
                for _ in range(args.rounds):
                    runs["model"].append(images_per_second(ready, len(images), backbone, precision))
                    for name, (variant, decode_size) in variants.items():
                        loader = image_loader(
                            folder,
                            images,
                            variant,
                            decode_size=decode_size,
                            batch_size=batch_size,
                            num_workers=workers,
                        )
                        runs[name].append(
                            images_per_second(loader, len(images), backbone, precision)
                        )
                        del loader  # stops its workers before the next measurement
                    runs["decode only"].append(
                        loader_speed(folder, images, transform, size, batch_size, workers)
                    )
                speed = {name: float(np.median(values)) for name, values in runs.items()}
                ratio = speed["extract"] / speed["model"]
                ceiling = speed["decode only"] / (speed["decode only"] + speed["model"])
                results[size, wanted, workers] = ratio
                print(
                    f"{size:>5} {wanted + ' = ' + precision_name(precision):<25} {workers:>7} "
                    f"{speed['model']:>12.1f} {speed['extract']:>14.1f} "
                    f"{speed['full decode']:>12.1f} {speed['per-image norm']:>15.1f} "
                    f"{speed['decode only']:>12.1f} {ceiling:>8.2f} {ratio:>6.2f}",
                    flush=True,
                )
    preferred = [(size, "auto", args.workers[0]) for size in (224, *args.sizes)]
    last = next((key for key in preferred if key in results), next(iter(results)))
    print(f"ratio={results[last]:.2f}")


if __name__ == "__main__":
    main()
