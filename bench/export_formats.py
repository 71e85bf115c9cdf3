"""Export formats side by side: which one should the export stage write?

One process, the shipped EfficientNet-Lite0 (pretrained, a random 10-class head, temperature
1.5) at --size, on the same uint8 batches:
- eager torch (the Classifier behind the export's own wrapper; what `headstart predict` runs);
- every entry of headstart.export.EXPORT_FORMATS through `export_model` (the product's own
  exporter and check): ONNX in onnxruntime (CPUExecutionProvider), TorchScript;
- torch.export's `.pt2` (torch.export.save / load), the candidate that is not a product format.
For each: export time, file size, load time, images/s at batch 1 and at --batch (warm-up calls
not timed; the formats take turns for --rounds rounds and the median is reported, so drift in
the machine's speed moves every format alike), and the largest |probability difference| from
eager on one --batch batch. Every runtime gets the same thread count (--threads, default 1:
the machine is shared). Eager runs channels-last, as predict does.

    python bench/export_formats.py
    python bench/export_formats.py --size 224 --batch 32 --seconds 2 --rounds 5

The last line is each format's speed relative to eager at both batch sizes.
"""

from __future__ import annotations

import argparse
import io
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from headstart.backbone_specs import LITE_MEAN, LITE_STD
from headstart.backbones import build_backbone
from headstart.checkpoints import save_checkpoint
from headstart.export import EXPORT_FORMATS, NormalisedClassifier, export_model
from headstart.export_onnx import INPUT_NAME, Uint8Input
from headstart.model import Classifier, load_classifier

CLASSES = [f"class_{i}" for i in range(10)]
TEMPERATURE = 1.5


def _checkpoint(folder: Path, size: int) -> Path:
    torch.manual_seed(0)
    model = Classifier(build_backbone("efficientnet_lite0", "pretrained"), len(CLASSES))
    path = folder / "finetuned.pt"
    meta = {
        "kind": "classifier",
        "backbone": "efficientnet_lite0",
        "num_features": model.backbone.num_features,
        "image_size": size,
        "mean": list(LITE_MEAN),
        "std": list(LITE_STD),
        "classes": CLASSES,
        "params": {},
        "summary": {},
    }
    save_checkpoint(path, model.state_dict(), meta)
    return path


def _images(batch: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


def _throughput(run, images: torch.Tensor, seconds: float) -> float:
    """Images per second of `run(images)` over about `seconds`, after two untimed calls."""
    run(images)
    run(images)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        run(images)
        calls += 1
    return calls * len(images) / (time.perf_counter() - start)


def _eager(checkpoint: Path, folder: Path):
    start = time.perf_counter()
    model, meta = load_classifier(checkpoint)
    inner = NormalisedClassifier(model, meta["mean"], meta["std"], TEMPERATURE)
    module = Uint8Input(inner).eval().to(memory_format=torch.channels_last)  # as predict
    loaded = time.perf_counter() - start

    def run(images):
        with torch.inference_mode():
            return module(images.to(memory_format=torch.channels_last)).numpy()

    return None, checkpoint.stat().st_size, loaded, run


def _product(name: str):
    def make(checkpoint: Path, folder: Path):
        start = time.perf_counter()
        data, _ = export_model(name, checkpoint, TEMPERATURE)
        exported = time.perf_counter() - start
        path = folder / f"model{EXPORT_FORMATS[name].suffix}"
        path.write_bytes(data)
        start = time.perf_counter()
        if name == "onnx":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )

            def run(images):
                return session.run(None, {INPUT_NAME: images.numpy()})[0]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(path))

            def run(images):
                with torch.inference_mode():
                    return module(images).numpy()

        return exported, len(data), time.perf_counter() - start, run

    return make


def _pt2(checkpoint: Path, folder: Path):
    model, meta = load_classifier(checkpoint)
    size = meta["image_size"]
    module = Uint8Input(NormalisedClassifier(model, meta["mean"], meta["std"], TEMPERATURE))
    start = time.perf_counter()
    program = torch.export.export(
        module.eval(),
        (_images(2, size, 0),),
        dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    exported = time.perf_counter() - start
    path = folder / "model.pt2"
    path.write_bytes(buffer.getvalue())
    start = time.perf_counter()
    loaded_module = torch.export.load(str(path)).module()
    loaded = time.perf_counter() - start

    def run(images):
        with torch.inference_mode():
            return loaded_module(images).numpy()

    return exported, path.stat().st_size, loaded, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="input size (Lite0's own: 224)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=2.0, help="timed per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="turns each format takes")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    candidates = {"eager": _eager, "onnx": _product("onnx")}
    candidates["torchscript"] = _product("torchscript")
    candidates["pt2"] = _pt2
    single, batch = _images(1, args.size, 1), _images(args.batch, args.size, 2)
    rows, runs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = _checkpoint(Path(tmp), args.size)
        for name, make in candidates.items():
            exported, size_bytes, loaded, runs[name] = make(checkpoint, Path(tmp))
            rows[name] = {
                "export_s": exported,
                "mb": size_bytes / 1e6,
                "load_s": loaded,
                "probabilities": runs[name](batch),
                "ips_1": [],
                "ips_batch": [],
            }
        for _ in range(args.rounds):
            for name, run in runs.items():
                rows[name]["ips_1"].append(_throughput(run, single, args.seconds))
                rows[name]["ips_batch"].append(_throughput(run, batch, args.seconds))
    for row in rows.values():
        row["ips_1"], row["ips_batch"] = np.median(row["ips_1"]), np.median(row["ips_batch"])
    eager = rows["eager"]
    print(
        f"EfficientNet-Lite0 at {args.size} px, {args.threads} thread(s); "
        f"images/s at batch 1 and {args.batch}, medians of {args.rounds} rounds"
    )
    print(
        f"{'format':<12} {'export s':>9} {'MB':>7} {'load s':>7} {'img/s b1':>9} "
        f"{f'img/s b{args.batch}':>10} {'max |dp|':>9}"
    )
    for name, row in rows.items():
        difference = float(np.abs(row["probabilities"] - eager["probabilities"]).max())
        exported = "-" if row["export_s"] is None else f"{row['export_s']:.1f}"
        print(
            f"{name:<12} {exported:>9} {row['mb']:>7.1f} {row['load_s']:>7.2f} "
            f"{row['ips_1']:>9.1f} {row['ips_batch']:>10.1f} {difference:>9.1e}"
        )
    print(
        " ".join(
            f"{name}_b1={row['ips_1'] / eager['ips_1']:.2f} "
            f"{name}_b{args.batch}={row['ips_batch'] / eager['ips_batch']:.2f}"
            for name, row in rows.items()
            if name != "eager"
        )
    )


if __name__ == "__main__":
    main()
