"""What the pipeline knows about a backbone before building it, without importing torch: the
registry of families (BACKBONES), their input size, normalisation and block count, and the
`timm:` names. Reading and checking params.yaml needs only this, so a stage that runs no model
(prepare) starts without paying torch's import; headstart.backbones builds the networks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from headstart.errors import ParamsError

# backbone.name prefix of the timm models (headstart.timm_backbones).
TIMM_PREFIX = "timm:"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled to [-1, 1]: (x * 255 - 127) / 128.
LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)


@dataclass(frozen=True)
class BackboneSpec:
    """What the pipeline needs to know about a family before building it."""

    name: str
    build: Callable[..., Any]  # (weights spec, **options) -> backbones.Backbone
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_size: int  # the input size the weights were trained at
    num_blocks: int  # what finetune.unfreeze counts (checked against the built one by a test)
    interpolation: str = "bicubic"  # of the resize before the centre crop
    crop_pct: float = 1.0  # the crop's share of the resized short side
    fixed_size: bool = False  # takes default_size only (a ViT without position interpolation)
    drop_path: bool = False  # has stochastic depth: build(weights, drop_path=rate) is accepted


def _build(family: str, argument: Any, weights: str, **options: Any) -> Any:
    from headstart.backbones import FAMILIES  # torch: imported when a network is built

    return FAMILIES[family](argument, weights, **options)


def _registered(
    name: str, family: str, argument: Any, num_blocks: int, **details: Any
) -> BackboneSpec:
    build = functools.partial(_build, family, argument)
    defaults = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "default_size": 224}
    return BackboneSpec(name, build, num_blocks=num_blocks, **(defaults | details))


BACKBONES: dict[str, BackboneSpec] = {
    # The input sizes the Lite variants were trained at; 7 stages + the 1x1 head conv each.
    **{
        f"efficientnet_lite{v}": _registered(
            f"efficientnet_lite{v}",
            "efficientnet_lite",
            v,
            8,
            mean=LITE_MEAN,
            std=LITE_STD,
            default_size=size,
            drop_path=True,
        )
        for v, size in ((0, 224), (1, 240), (2, 260))
    },
    **{n: _registered(n, "resnet", n, 4) for n in ("resnet18", "resnet34", "resnet50")},
    "resnet101": _registered("resnet101", "resnet", "resnet101", 4),
    "mobilenet_v3_small": _registered("mobilenet_v3_small", "features", "mobilenet_v3_small", 6),
    "mobilenet_v3_large": _registered("mobilenet_v3_large", "features", "mobilenet_v3_large", 7),
    **{n: _registered(n, "features", n, 8) for n in ("efficientnet_b0", "efficientnet_b1")},
    **{n: _registered(n, "convnext", n, 4) for n in ("convnext_tiny", "convnext_small")},
}


def backbone_spec(name: str) -> BackboneSpec:
    """What a backbone name (registered, or `timm:<model>`) needs before it is built."""
    if name.startswith(TIMM_PREFIX):
        from headstart.timm_backbones import timm_spec

        return timm_spec(name)
    if name not in BACKBONES:
        raise ParamsError(
            f"backbone.name: unknown {name!r}; known: {', '.join(sorted(BACKBONES))}, or any "
            "timm model as timm:<name> (docs/backbones.md)"
        )
    return BACKBONES[name]


def drop_path_unsupported(name: str) -> str:
    return (
        f"params.yaml: finetune.drop_path: {name} has no stochastic depth here; set it to 0.0, "
        "or use efficientnet_lite* or a timm: model"
    )
