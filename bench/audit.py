"""The data audit: its duplicate threshold, its recall of flipped labels, and its cost.

Three parts, each through the audit's own functions (headstart.audit):

- `calibrate`: copies of 200 built-in digits (resized, re-encoded, cropped), extracted with the
  committed backbone at the digits' input size (96 px) beside the originals. Prints the cosine
  similarity of each original to its copies, per kind of copy, against its most similar
  *other* digit of the same class; and how often pHash (prepare's data.near_copies) is equal.
  audit.duplicate_threshold is chosen between the two.
- `flips`: the digits' real features (extracted once); for each seed, a share of the labels
  flipped to another class at random; the audit's label-quality ranking's top N (N = the number
  flipped) against the flipped images: precision and recall at N, and of cleanlab's own list.
- `timing`: the whole audit (`headstart.audit.audit`) on generated features (random class
  centres plus noise, 1280 wide like efficientnet_lite0's), each size in a fresh process:
  seconds per part (after a warm-up run that pays for the imports) and the process's peak
  memory (ru_maxrss), beside its peak before the timed runs (Python, torch, scikit-learn and
  the generated features loaded).

    python bench/audit.py calibrate
    python bench/audit.py flips --share 0.03 --seeds 5 [--c 0.01,0.1,1]
    python bench/audit.py timing --sizes 1000,10000,50000
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: a table, not bars

from headstart.audit import (
    AuditData,
    audit,
    label_issues,
    near_duplicate_pairs,
    normalised,
    out_of_sample_probabilities,
    outlier_scores,
    read_audit_data,
)
from headstart.builtin import write_digits
from headstart.extraction import extract_features
from headstart.index import INDEX_HEADER, load_prepared, prepare_index
from headstart.io import write_csv, write_json
from headstart.near_copies import perceptual_hash
from headstart.params import load_params

DIGITS_SIZE = 96  # what backbone.image_size auto gives the 8x8 digits


def _jpeg(image: Image.Image, quality: int = 85) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


# Kinds of copy: what a folder of real photos collects (the same image saved twice).
COPIES = {
    "resized to 32 px (bicubic)": lambda im: im.resize((32, 32), Image.Resampling.BICUBIC),
    "resized to 64 px (nearest)": lambda im: im.resize((64, 64), Image.Resampling.NEAREST),
    "re-encoded as JPEG q85": _jpeg,
    "64 px bicubic, then JPEG q85": lambda im: _jpeg(im.resize((64, 64), Image.Resampling.BICUBIC)),
    "64 px, 3 px cropped per side": lambda im: im.resize((64, 64), Image.Resampling.BICUBIC).crop(
        (3, 3, 61, 61)
    ),
}


def _extract(folder: Path, work: Path, image_size: int | str) -> AuditData:
    """prepare + extract (the committed backbone params) of `folder`, read back for the audit."""
    params = load_params()
    classes, rows, report = prepare_index(folder, 0.15, 0.15, params.data.seed)
    prepared_dir = work / "prepared"
    write_csv(prepared_dir / "index.csv", INDEX_HEADER, rows)
    write_json(prepared_dir / "classes.json", classes)
    write_json(prepared_dir / "report.json", report)
    prepared = load_prepared(folder, prepared_dir)
    backbone = dataclasses.replace(params.backbone, image_size=image_size)
    extract_features(prepared, backbone, params.compute, params.inference, work / "features")
    return read_audit_data(prepared, work / "features")


# Copies of a photo-sized image, for pHash alone (no backbone).
PHOTO_COPIES = {
    "resized to half (bicubic)": lambda im: im.resize((128, 128), Image.Resampling.BICUBIC),
    "re-encoded as JPEG q75": lambda im: _jpeg(im, 75),
    "cropped 4% per side": lambda im: im.crop((10, 10, 246, 246)),
    "lossless (same pixels)": lambda im: im.copy(),
}


def photo_hashes(count: int = 50) -> None:
    """How often pHash survives each copy of smooth generated 256 px images."""
    rng = np.random.default_rng(0)
    equal = {kind: 0 for kind in PHOTO_COPIES}
    for _ in range(count):
        small = np.clip(rng.normal(size=(8, 8, 3)) * 60 + 128, 0, 255).astype(np.uint8)
        image = Image.fromarray(small).resize((256, 256), Image.Resampling.BICUBIC)
        for kind, make in PHOTO_COPIES.items():
            equal[kind] += perceptual_hash(make(image)) == perceptual_hash(image)
    print(f"pHash equal on {count} generated 256 px images:")
    for kind, n in equal.items():
        print(f"  {kind:<28}{n / count:>6.0%}")


def calibrate(work: Path) -> None:
    photo_hashes()
    digits = work / "digits"
    write_digits(digits)
    originals = sorted(digits.rglob("*.png"))[::9][:200]
    folder = work / "copies"
    equal_hash = {kind: 0 for kind in COPIES}
    for path in originals:
        image = Image.open(path).convert("RGB")
        target = folder / path.parent.name
        target.mkdir(parents=True, exist_ok=True)
        image.save(target / path.name)
        for number, (kind, make) in enumerate(COPIES.items()):
            copy = make(image)
            copy.save(target / f"{path.stem}_copy{number}.png")
            equal_hash[kind] += perceptual_hash(copy) == perceptual_hash(image)
    copies = _extract(folder, work / "copies_run", DIGITS_SIZE)
    full = _extract(digits, work / "digits_run", DIGITS_SIZE)
    by_path = {p: i for i, p in enumerate(copies.paths)}
    unit, unit_full = normalised(copies.features), normalised(full.features)
    full_index = {p: i for i, p in enumerate(full.paths)}
    print(f"{len(originals)} digits, each with {len(COPIES)} copies, at {DIGITS_SIZE} px")
    thresholds = (0.95, 0.97, 0.98, 0.985)
    print(
        f"{'copy':<32}{'min':>8}{'1%':>8}{'median':>8}"
        + "".join(f"{'>= ' + str(t):>9}" for t in thresholds)
        + "   pHash equal"
    )
    lowest = 1.0
    for number, kind in enumerate(COPIES):
        sims = []
        for path in originals:
            name = f"{path.parent.name}/{path.name}"
            copy = f"{path.parent.name}/{path.stem}_copy{number}.png"
            sims.append(float(unit[by_path[name]] @ unit[by_path[copy]]))
        if "cropped" not in kind:
            lowest = min(lowest, min(sims))
        q = np.quantile(sims, [0.0, 0.01, 0.5])
        share = equal_hash[kind] / len(originals)
        caught = "".join(f"{np.mean(np.array(sims) >= t):>9.0%}" for t in thresholds)
        print(f"{kind:<32}{q[0]:>8.4f}{q[1]:>8.4f}{q[2]:>8.4f}{caught}   {share:>10.0%}")
    # Each digit's most similar other digit of its class, over all 1,797 (distinct scans).
    same_class = []
    for path in originals:
        i = full_index[f"{path.parent.name}/{path.name}"]
        sims = unit_full @ unit_full[i]
        sims[i] = -1.0
        sims[full.labels != full.labels[i]] = -1.0
        same_class.append(float(sims.max()))
    q = np.quantile(same_class, [0.5, 0.99, 1.0])
    print(
        f"{'other digit, same class (max)':<32}  median {q[0]:.4f}, 99% {q[1]:.4f}, max {q[2]:.4f}"
    )
    for threshold in thresholds:
        pairs, _, _ = near_duplicate_pairs(full.features, threshold)
        print(f"threshold {threshold}: {len(pairs)} pairs of distinct digits among all 1,797")
    print(f"lowest similarity of a resized or re-encoded copy: {lowest:.4f}")


def flips(work: Path, share: float, seeds: int, c_values: list[float]) -> None:
    digits = work / "digits"
    write_digits(digits)
    data = _extract(digits, work / "run", "auto")
    for c in c_values:
        _flips(data, share, seeds, c)


def _flips(data: AuditData, share: float, seeds: int, c: float) -> None:
    params = load_params().audit
    count = int(round(share * len(data.labels)))
    print(f"\naudit.logreg_c {c:g}, audit.folds {params.folds}")
    print(f"{len(data.labels)} digits, {count} labels flipped ({share:.0%}) per seed")
    print(
        f"{'seed':>4}{'precision@N':>13}{'recall@N':>10}{'cleanlab list':>15}{'its precision':>15}"
    )
    results = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        flipped = rng.choice(len(data.labels), size=count, replace=False)
        labels = data.labels.copy()
        labels[flipped] = (labels[flipped] + rng.integers(1, 10, size=count)) % 10
        noisy = dataclasses.replace(data, labels=labels)
        probabilities, _, _ = out_of_sample_probabilities(noisy, params.folds, c, params.seed)
        issues, quality = label_issues(labels, probabilities)
        top = set(np.argsort(quality, kind="stable")[:count].tolist())
        hits = len(top & set(flipped.tolist()))
        listed = len(set(issues.tolist()) & set(flipped.tolist()))
        results.append((hits / count, listed / max(len(issues), 1), listed / count))
        print(
            f"{seed:>4}{hits / count:>13.3f}{hits / count:>10.3f}{len(issues):>15}"
            f"{listed / max(len(issues), 1):>15.3f}"
        )
    at_n = [r[0] for r in results]
    print(
        f"precision = recall at N = {count}: mean {np.mean(at_n):.3f}, min {min(at_n):.3f}; "
        f"cleanlab's list: precision {np.mean([r[1] for r in results]):.3f}, recall "
        f"{np.mean([r[2] for r in results]):.3f}"
    )


def generated(size: int, classes: int = 10, width: int = 1280, seed: int = 0) -> AuditData:
    """Random features: class centres plus noise, split 70/15/15 at random."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=size)
    centres = rng.normal(size=(classes, width)).astype(np.float32)
    features = centres[labels] + 2.0 * rng.normal(size=(size, width)).astype(np.float32)
    splits = rng.choice(3, size=size, p=[0.7, 0.15, 0.15]).astype(np.int8)
    order = np.argsort(splits, kind="stable")
    return AuditData(
        [f"{labels[i]}/{i}.png" for i in order],
        labels[order],
        splits[order],
        features[order],
        [str(c) for c in range(classes)],
    )


def timing_one(size: int) -> dict:
    params = load_params().audit
    audit(generated(200, seed=1), params)  # imports and first calls, not counted
    data = generated(size)
    parts = {"baseline_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    start = time.perf_counter()
    probabilities, _, _ = out_of_sample_probabilities(
        data, params.folds, params.logreg_c, params.seed
    )
    parts["cross-validation"] = time.perf_counter() - start
    start = time.perf_counter()
    label_issues(data.labels, probabilities)
    parts["cleanlab"] = time.perf_counter() - start
    start = time.perf_counter()
    near_duplicate_pairs(data.features, params.duplicate_threshold)
    parts["near-duplicates"] = time.perf_counter() - start
    start = time.perf_counter()
    outlier_scores(data.features, data.splits, params.neighbours)
    parts["outliers"] = time.perf_counter() - start
    start = time.perf_counter()
    audit(data, params)
    parts["whole audit"] = time.perf_counter() - start
    parts["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    parts["features_mib"] = data.features.nbytes / 2**20
    return parts


def timing(sizes: list[int]) -> None:
    print(f"{'images':>7}{'CV':>8}{'cleanlab':>10}{'near-dup':>10}{'outliers':>10}"
          f"{'audit':>8}{'peak MiB':>10}{'before MiB':>12}{'features MiB':>14}")  # fmt: skip
    for size in sizes:
        output = subprocess.run(
            [sys.executable, __file__, "timing-one", str(size)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        r = json.loads(output.strip().splitlines()[-1])
        print(
            f"{size:>7}{r['cross-validation']:>8.1f}{r['cleanlab']:>10.1f}"
            f"{r['near-duplicates']:>10.1f}{r['outliers']:>10.1f}{r['whole audit']:>8.1f}"
            f"{r['peak_mib']:>10.0f}{r['baseline_mib']:>12.0f}{r['features_mib']:>14.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("calibrate", "flips", "timing", "timing-one"))
    parser.add_argument("size", nargs="?", type=int)
    parser.add_argument("--share", type=float, default=0.03)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--c", default="", help="audit.logreg_c values (default: params.yaml)")
    parser.add_argument("--sizes", default="1000,10000,50000")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.part == "timing-one":
        print(json.dumps(timing_one(args.size)))
        return
    if args.part == "timing":
        timing([int(s) for s in args.sizes.split(",")])
        return
    with tempfile.TemporaryDirectory(prefix="headstart-audit-") as work:
        if args.part == "calibrate":
            calibrate(Path(work))
        else:
            c_values = [float(c) for c in args.c.split(",")] if args.c else []
            flips(Path(work), args.share, args.seeds, c_values or [load_params().audit.logreg_c])


if __name__ == "__main__":
    main()
