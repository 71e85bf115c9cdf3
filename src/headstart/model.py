"""The classifier (backbone + linear head) and the surgery that decides what trains.

Vocabulary as in fastai: the body is the pretrained backbone, the head a linear layer on its
pooled features. `set_trainable(model, unfreeze)` makes the head and the top `unfreeze` blocks
trainable; everything below stays frozen, in eval mode, with its BatchNorm statistics intact.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from headstart.errors import ArtifactError, ParamsError
from headstart.schemas import archive_kind, check_classifier_meta, check_head_meta, load_weights

log = logging.getLogger(__name__)


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))  # (B, num_classes) logits


class _Bottom(nn.Module):
    """stem -> the lower blocks: the frozen part of a Classifier, below the cut."""

    def __init__(self, model: Classifier, cut: int):
        super().__init__()
        self.stem = model.backbone.stem
        self.blocks = nn.ModuleList(list(model.backbone.blocks)[:cut])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        for block in self.blocks:
            x = block(x)
        return x  # (B, C, H, W): the activations at the cut


class _Top(nn.Module):
    """The top blocks -> neck -> head: what fine-tuning trains, from activations at the cut."""

    def __init__(self, model: Classifier, cut: int):
        super().__init__()
        self.blocks = nn.ModuleList(list(model.backbone.blocks)[cut:])
        self.neck = model.backbone.neck
        self.head = model.head

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        x = activations
        for block in self.blocks:
            x = block(x)
        return self.head(self.neck(x))


def split_at_cut(model: Classifier, unfreeze: int) -> tuple[nn.Module, nn.Module]:
    """(bottom, top) with top(bottom(x)) == model(x), cut below the top `unfreeze` blocks.

    Both share their modules with `model`: training `top` trains `model`. Used to fine-tune
    from activations cached once at the cut instead of rerunning the frozen blocks each epoch;
    only a `sequential` backbone can be cut.
    """
    if not model.backbone.sequential:
        raise ValueError(f"{type(model.backbone).__name__} cannot be split between its blocks")
    cut = len(model.backbone.blocks) - unfreeze
    return _Bottom(model, cut), _Top(model, cut)


def set_trainable(model: Classifier, unfreeze: int) -> list[nn.Module]:
    """Freeze the backbone except its top `unfreeze` blocks; the head always trains.

    Returns the frozen modules (stem, lower blocks, and the neck when nothing above it
    trains), which `train_mode` keeps in eval mode.
    """
    blocks = model.backbone.num_blocks
    if unfreeze > blocks:
        raise ParamsError(
            f"params.yaml: finetune.unfreeze: {unfreeze} is more blocks than this backbone has "
            f"({blocks}); use 0..{blocks}"
        )
    frozen = model.backbone.freeze(unfreeze)
    model.head.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    names = model.backbone.block_names()[blocks - unfreeze :]
    log.info(
        "trainable: head + top %d of %d blocks (%s), %d of %d parameters (%.1f%%)",
        unfreeze,
        blocks,
        ", ".join(names) or "none",
        trainable,
        total,
        100.0 * trainable / total,
    )
    return frozen


def train_mode(model: nn.Module, frozen: list[nn.Module], bn: str) -> None:
    """model.train(), then put frozen parts (and, with bn='frozen', every BatchNorm) back in eval.

    Frozen BatchNorm keeps the pretrained running statistics: on small datasets, statistics
    re-estimated from few, augmented batches drift and wreck accuracy.
    """
    model.train()
    for module in frozen:
        module.eval()
    if bn == "frozen":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def param_groups(
    model: Classifier,
    lr_head: float,
    lr_backbone: float,
    weight_decay: float,
    layer_decay: float = 1.0,
) -> list[dict]:
    """Head and backbone groups, each with its own learning rate; only trainable parameters.

    Biases and normalisation weights (1-d tensors) get no weight decay. With `layer_decay`
    below 1, the k-th block down from the top trains at lr_backbone * layer_decay^k (the neck,
    and any trained parameter no block holds, with the top block): the lower a block, the more
    general its features, and the less fine-tuning should move them.
    """
    parts = [("head", list(model.head.parameters()), lr_head)]
    if layer_decay == 1.0:
        parts.append(("backbone", list(model.backbone.parameters()), lr_backbone))
    else:
        blocks = model.backbone.block_parameters()
        in_blocks = {id(p) for block in blocks for p in block}
        rest = [p for p in model.backbone.parameters() if id(p) not in in_blocks]
        for depth, block in enumerate(reversed(blocks)):
            index = len(blocks) - 1 - depth
            params = block + (rest if depth == 0 else [])
            parts.append((f"backbone_block{index}", params, lr_backbone * layer_decay**depth))
    groups = []
    for name, members, lr in parts:
        params = [p for p in members if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        if decay:
            groups.append({"name": name, "params": decay, "lr": lr, "weight_decay": weight_decay})
        if no_decay:
            groups.append(
                {"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0}
            )
    for group in groups:
        log.info(
            "param group %s: %d tensors, lr %.2e", group["name"], len(group["params"]), group["lr"]
        )
    return groups


def load_classifier(path) -> tuple[Classifier, dict]:
    """Rebuild a fine-tuned Classifier from its checkpoint (architecture from the metadata)."""
    from headstart.backbones import build_backbone
    from headstart.checkpoints import load_checkpoint

    kind = "onnx" if Path(path).suffix == ".onnx" else archive_kind(path)
    if kind in ("onnx", "torchscript"):
        name = {"onnx": "an ONNX", "torchscript": "a TorchScript"}[kind]
        raise ArtifactError(
            f"{path}: this is {name} export (what headstart export writes); pass the "
            "checkpoint it was made from, e.g. models/finetuned.pt"
        )
    state, meta = load_checkpoint(path)
    meta = check_classifier_meta(path, meta)
    _warn_on_other_timm(path, meta)
    model = Classifier(build_backbone(meta["backbone"], "none"), len(meta["classes"]))
    load_weights(path, model, state)
    return model.eval(), meta


def _warn_on_other_timm(path, meta: dict) -> None:
    """A timm model rebuilt by another timm version may differ; say so (it still loads)."""
    from importlib import metadata

    from headstart.backbone_specs import TIMM_PREFIX

    if not meta["backbone"].startswith(TIMM_PREFIX):
        return
    recorded = (meta.get("environment") or {}).get("packages", {}).get("timm")
    installed = metadata.version("timm")
    if recorded and recorded != installed:
        log.warning(
            "%s was made with timm %s, this is timm %s: predictions may differ slightly",
            path,
            recorded,
            installed,
        )


def load_head(path) -> tuple[nn.Linear, dict]:
    """Rebuild the linear head trained on cached features."""
    from headstart.checkpoints import load_checkpoint

    state, meta = load_checkpoint(path)
    meta = check_head_meta(path, meta)
    head = nn.Linear(meta["in_features"], len(meta["classes"]))
    load_weights(path, head, state)
    return head.eval(), meta
