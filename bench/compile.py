"""torch.compile: does it speed up this pipeline's forward passes and training steps here?

Side by side in one process, on ready-made tensors (no decoding), the default backbone:
- extraction: eval-mode forward passes at --size, bfloat16 autocast where the CPU has it
  (what `precision: auto` runs), channels-last, eager versus `torch.compile(backbone)`;
- fine-tuning: training steps of the classifier (head + top `finetune.unfreeze` blocks
  trainable, the rest frozen) at --train-size, float32 (what auto runs on a CPU), eager versus
  compiled.
Compilation time is reported apart; the speeds exclude it (warm-up batches are not timed).

    python bench/compile.py
    python bench/compile.py --size 224 --train-size 96 --batches 20

The last line is the compiled/eager speed ratios. The pipeline keeps a path only if it wins.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from torch import nn

from headstart.backbones import build_backbone
from headstart.model import Classifier, set_trainable
from headstart.params import load_params
from headstart.runtime import cpu_has_native_bf16, set_threads


def _timed(step, batches: int, warmup: int) -> tuple[float, float]:
    """(seconds for the warm-up calls, which include any compilation; seconds per call after)."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        step()
    return warm, (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="extraction input size")
    parser.add_argument("--train-size", type=int, default=96, help="fine-tuning input size")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per side")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    params = load_params()
    set_threads(params.compute.threads)
    torch.manual_seed(0)
    precision = torch.bfloat16 if cpu_has_native_bf16() else None

    backbone = build_backbone(params.backbone.name, params.backbone.weights).eval()
    images = torch.randn(args.batch, 3, args.size, args.size).to(memory_format=torch.channels_last)
    backbone.to(memory_format=torch.channels_last)

    def forward(module):
        def step():
            with (
                torch.inference_mode(),
                torch.autocast("cpu", dtype=precision, enabled=precision is not None),
            ):
                module(images)

        return step

    results = {}
    compiled = torch.compile(backbone)
    for label, module in (("eager", backbone), ("compiled", compiled)):
        warm, seconds = _timed(forward(module), args.batches, args.warmup)
        results[("extract", label)] = (warm, args.batch / seconds)

    model = Classifier(build_backbone(params.backbone.name, params.backbone.weights), 10)
    set_trainable(model, params.finetune.unfreeze)
    model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    train_images = torch.randn(args.batch, 3, args.train_size, args.train_size).to(
        memory_format=torch.channels_last
    )
    labels = torch.randint(0, 10, (args.batch,))

    def train_step(module):
        def step():
            loss = nn.functional.cross_entropy(module(train_images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    compiled_model = torch.compile(model)
    for label, module in (("eager", model), ("compiled", compiled_model)):
        warm, seconds = _timed(train_step(module), args.batches, args.warmup)
        results[("finetune", label)] = (warm, args.batch / seconds)

    ratios = {}
    for task, size in (("extract", args.size), ("finetune", args.train_size)):
        eager_warm, eager = results[(task, "eager")]
        compiled_warm, fast = results[(task, "compiled")]
        ratios[task] = fast / eager
        print(
            f"{task} at {size} px: eager {eager:.1f} img/s, compiled {fast:.1f} img/s "
            f"({ratios[task]:.2f}x); warm-up {eager_warm:.1f} s vs {compiled_warm:.1f} s "
            "(compilation included)"
        )
    print(f"compile_extract={ratios['extract']:.2f} compile_finetune={ratios['finetune']:.2f}")


if __name__ == "__main__":
    main()
