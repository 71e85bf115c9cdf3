"""Any timm model as a backbone: `backbone.name: timm:<model name>`.

Anything timm.create_model accepts, pretrained tag included (`timm:convnext_tiny.fb_in22k`,
`timm:vit_small_patch14_dinov2.lvd142m`), and `timm:hf-hub:<repo>` names. timm's own seams do
the work:
- input size, mean, std, interpolation and crop: resolve_model_data_config;
- features: forward_features, then forward_head(pre_logits=True): pooled and normalised as the
  model's own classifier would see them;
- what a block is: the model's group_matcher(coarse=True), as timm's layer-wise decay uses it.
  One stage of a CNN (ResNet's layerN, ConvNeXt's stages.N, EfficientNet's blocks.N), one
  transformer block of a ViT (blocks.N, the final norm going with the last one). The stem is
  the first group; parameters no group claims (ConvNeXt's head norm, a ViT's fc_norm) are the
  neck, which trains whenever a block does.

Weights: `pretrained` through timm from the Hugging Face hub (its cache, ~/.cache/huggingface);
offline, a cached copy is loaded and a missing one is a one-line error naming the file to fetch.
A local `.safetensors` or `.pth` state dict is loaded without executing code and handed to
timm, which applies the model's own checkpoint filter. `none` builds the architecture only.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from headstart.backbone_specs import TIMM_PREFIX, BackboneSpec, drop_path_unsupported
from headstart.backbones import load_state_dict_file
from headstart.errors import ArtifactError, MissingFileError, ParamsError

log = logging.getLogger(__name__)

# Never a parameter or module name: group_with_matcher puts it in the group of names no pattern
# claims, which is how that group (the neck) is told from the last block.
_UNCLAIMED = "\0unclaimed"


def _timm():
    import timm

    return timm


def _arch(name: str) -> str:
    return name[len(TIMM_PREFIX) :]


def _create(name: str, **kwargs) -> nn.Module:
    """timm.create_model, with an unknown model or tag, or an unreachable hub, as one line."""
    timm = _timm()
    arch = _arch(name)
    if not arch.startswith("hf-hub:") and not timm.is_model(arch):
        close = difflib.get_close_matches(arch.split(".")[0], timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ParamsError(
            f"backbone.name: {name!r} is not a timm model{hint} (timm.list_models() lists them)"
        )
    try:
        return timm.create_model(arch, **kwargs)
    except TypeError as error:
        if "drop_path_rate" not in str(error):
            raise
        raise ParamsError(drop_path_unsupported(name)) from error
    except RuntimeError as error:
        if "Invalid pretrained tag" not in str(error):
            raise
        base = arch.split(".")[0]
        tags = ", ".join(timm.list_pretrained(f"{base}.*")) or "none"
        raise ParamsError(f"backbone.name: {name!r}: {error} Tags it has: {tags}") from error
    except OSError as error:  # huggingface_hub's LocalEntryNotFoundError, connection errors
        raise MissingFileError(
            f"backbone.name {name}: cannot fetch its config from the Hugging Face hub "
            f"({error}); offline, name the model by its timm name (timm:<name>.<tag>) instead "
            "of hf-hub:, or copy a Hugging Face cache (~/.cache/huggingface/hub) that has it"
        ) from error


def _groups(model: nn.Module) -> tuple[list[str], list[list[str]], list[str]]:
    """(stem, blocks bottom to top, neck): parameter and module names, by group_matcher."""
    from timm.models._manipulate import group_with_matcher

    matcher = model.group_matcher(coarse=True)
    names = [n for n, _ in model.named_parameters()]
    names += [n for n, _ in model.named_modules() if n] + [_UNCLAIMED]
    grouped = group_with_matcher(((n, None) for n in names), matcher)
    groups = [list(grouped[key]) for key in sorted(grouped)]
    neck: list[str] = []
    if _UNCLAIMED in groups[-1]:
        neck = [n for n in groups.pop() if n != _UNCLAIMED]
    # The first pattern is the stem's in timm's models; one without a stem has only blocks.
    has_stem = not isinstance(matcher, dict) or next(iter(matcher), None) == "stem"
    stem = groups.pop(0) if has_stem and groups else []
    if not groups:
        raise ParamsError(
            f"{type(model).__name__}: timm gives it no blocks (group_matcher), so "
            "finetune.unfreeze has nothing to count; pick another model"
        )
    return stem, groups, neck


class TimmBackbone(nn.Module):
    """A timm model without its classifier: (B, 3, S, S) -> (B, num_features) pre-logits."""

    sequential = False  # timm's forward is one call: finetune cannot cache activations mid-way

    def __init__(self, model: nn.Module, name: str, width: int):
        super().__init__()
        self.model = model
        self.name = name
        self.num_features = width
        self._stem, self._blocks, self._neck = _groups(model)

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

    def freeze(self, unfreeze: int) -> list[nn.Module]:
        """Make only the top `unfreeze` blocks (and the neck) trainable; return the frozen
        modules, which training keeps in eval mode (every frozen norm keeps its statistics;
        LayerNorm has none, so for it eval and train are the same)."""
        self.requires_grad_(False)
        if unfreeze == 0:
            return [self.model]
        cut = len(self._blocks) - unfreeze
        trainable = {n for block in self._blocks[cut:] for n in block} | set(self._neck)
        for name, parameter in self.model.named_parameters():
            if name in trainable:
                parameter.requires_grad_(True)
        frozen = set(self._stem) | {n for block in self._blocks[:cut] for n in block}
        return [m for n, m in self.model.named_modules() if n in frozen]

    def block_parameters(self) -> list[list[nn.Parameter]]:
        """Each block's parameters, bottom to top (finetune.layer_decay's depths)."""
        named = dict(self.model.named_parameters())
        return [[named[n] for n in sorted(block) if n in named] for block in self._blocks]

    def block_names(self) -> list[str]:
        """Each block's top-level modules, e.g. `blocks.11+norm` or `stages.3`."""
        modules = {n for n, _ in self.model.named_modules() if n}
        labels = []
        for block in self._blocks:
            tops = [n for n in block if n in modules and n.rpartition(".")[0] not in block]
            labels.append("+".join(tops) or block[0])
        return labels


def _width(model: nn.Module, size: int) -> int:
    """The pre-logits width, from a forward pass on the meta device (no memory, no time)."""
    with torch.no_grad():
        out = model.forward_head(
            model.forward_features(torch.empty(1, 3, size, size, device="meta")), pre_logits=True
        )
    return int(out.shape[-1])


@functools.lru_cache(maxsize=32)
def _meta_model(name: str) -> nn.Module:
    """The architecture on the meta device: its config, groups and shapes, no weights
    allocated or fetched. Shared, so never modified (a meta forward pass gives shapes)."""
    with torch.device("meta"):
        return _create(name, pretrained=False, num_classes=0)


@functools.lru_cache(maxsize=32)
def timm_spec(name: str) -> BackboneSpec:
    """The model's input size, normalisation, resize and block count, from its config."""
    model = _meta_model(name)
    config = _timm().data.resolve_model_data_config(model)
    _, height, width = config["input_size"]
    return BackboneSpec(
        name=name,
        build=functools.partial(build_timm, name),
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        default_size=int(min(height, width)),
        num_blocks=len(_groups(model)[1]),
        interpolation=str(config["interpolation"]),
        crop_pct=float(config["crop_pct"]),
        fixed_size=bool(model.pretrained_cfg.get("fixed_input_size", False)),
        drop_path=True,  # most timm models; one without it refuses drop_path_rate (_create)
    )


def build_timm(name: str, weights: str, drop_path: float = 0.0) -> TimmBackbone:
    """The timm model `name` with `weights` (`pretrained`, `none`, or a state-dict file) and
    stochastic depth rate `drop_path` (timm's drop_path_rate)."""
    options = {"drop_path_rate": drop_path} if drop_path else {}
    if weights == "none":
        model = _create(name, pretrained=False, num_classes=0, **options)
    elif weights == "pretrained":
        model = _pretrained(name, **options)
    elif "_Weights." in weights:
        raise ParamsError(
            f"backbone.weights: {weights} is a torchvision weights name; timm models take "
            "`pretrained`, `none` or a state-dict file under pretrained/"
        )
    else:
        state = load_state_dict_file(Path(weights))
        model = _from_state_dict(name, Path(weights), state, **options)
    width = _width(_meta_model(name), timm_spec(name).default_size)
    backbone = TimmBackbone(model, name, width)
    log.info("timm %s: blocks are %s", name, ", ".join(backbone.block_names()))
    return backbone


def _from_state_dict(name: str, path: Path, state: dict, **options) -> nn.Module:
    """Build `name` with a state dict through timm's own loading (its checkpoint filter, its
    strict key check); a classifier in the file is loaded, then removed."""
    classifier = _meta_model(name).pretrained_cfg.get("classifier") or ""
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    has_classifier = any(f"{c}.weight" in state for c in classifiers)
    options = options | ({} if has_classifier else {"num_classes": 0})
    overlay = {"state_dict": state, **({} if has_classifier else {"num_classes": 0})}
    try:
        model = _create(name, pretrained=True, pretrained_cfg_overlay=overlay, **options)
    except (RuntimeError, KeyError, ValueError) as error:  # missing or unexpected keys, shapes
        detail = " ".join(str(error).split())[:300]
        raise ArtifactError(
            f"{path}: its tensors do not fit {name} ({detail}); use the weights of that model"
        ) from error
    model.reset_classifier(0)
    return model


def _pretrained(name: str, **options) -> nn.Module:
    """Through timm from the hub when it can be reached; offline, from the hub cache."""
    config = _meta_model(name).pretrained_cfg
    hub_id = config.get("hf_hub_id")
    url = f"https://huggingface.co/{hub_id}/resolve/main/model.safetensors" if hub_id else None
    url = url or config.get("url") or "(no download source known to timm)"
    if not _hub_reachable():
        cached = _cached_weights(hub_id) if hub_id else None
        if cached is not None:
            log.info("offline: loading %s from the Hugging Face cache, %s", name, cached)
            return _from_state_dict(name, cached, load_state_dict_file(cached), **options)
        _offline_error(name, url, "the Hugging Face hub cannot be reached")
    try:
        model = _create(name, pretrained=True, **options)
    except MissingFileError as error:
        _offline_error(name, url, str(error.__cause__ or error))
    except OSError as error:  # timm's own URL downloads
        _offline_error(name, url, str(error))
    model.reset_classifier(0)
    return model


def _offline_error(name: str, url: str, reason: str) -> None:
    stem = _arch(name).replace("hf-hub:", "").replace("/", "_")
    local = f"pretrained/{stem}.safetensors"
    raise MissingFileError(
        f"backbone.name {name}: cannot download its pretrained weights ({reason}); on a "
        f"machine with internet fetch {url}, save it here as {local} and set backbone.weights: "
        f"{local} (or copy that machine's ~/.cache/huggingface/hub here)"
    )


def _cached_weights(hub_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _hub_reachable() -> bool:
    """False when the hub is known to be unreachable: HF_HUB_OFFLINE, or its host does not
    resolve (and no proxy is set). Checked first because the hub client retries for a minute
    before it gives up."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True
