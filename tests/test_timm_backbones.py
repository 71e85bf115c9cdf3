"""timm models as backbones: blocks, weights (local files, offline), sizes, names.

Tiny random-init timm models (`test_vit`, `test_convnext`, `test_resnet`: timm's own test
architectures, a few hundred thousand parameters) stand in for the real ones; nothing is
downloaded.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from headstart import timm_backbones
from headstart.backbones import backbone_spec, build_backbone
from headstart.errors import ArtifactError, MissingFileError, ParamsError
from headstart.model import Classifier, set_trainable, train_mode
from headstart.params import parse_params

VIT = "timm:test_vit.r160_in1k"
CONVNEXT = "timm:test_convnext.r160_in1k"
RESNET = "timm:test_resnet.r160_in1k"


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("name", "unfreeze", "expected_prefixes"),
    [
        (VIT, 1, ("blocks.5.", "norm.")),
        (VIT, 2, ("blocks.4.", "blocks.5.", "norm.")),
        (CONVNEXT, 1, ("stages.3.", "head.norm.")),
        (CONVNEXT, 2, ("stages.2.", "stages.3.", "head.norm.")),
        (RESNET, 1, ("layer4.",)),
    ],
)
def test_unfreeze_makes_exactly_the_top_blocks_trainable(name, unfreeze, expected_prefixes):
    """finetune.unfreeze K: the top K transformer blocks of a ViT, the top K stages of a CNN
    (with the final norm, or ConvNeXt's head norm), and the head; nothing else."""
    model = Classifier(build_backbone(name, "none"), 3)
    set_trainable(model, unfreeze)
    inner = model.backbone.model
    expected = {
        f"backbone.model.{n}"
        for n, _ in inner.named_parameters()
        if n.startswith(expected_prefixes)
    }
    assert expected, "the prefixes name no parameter: the test is wrong"
    assert _trainable(model) == expected | {"head.weight", "head.bias"}


@pytest.mark.parametrize("name", [VIT, CONVNEXT, RESNET])
def test_unfreeze_zero_trains_the_head_only_and_the_spec_counts_the_blocks(name):
    backbone = build_backbone(name, "none")
    assert backbone.num_blocks == backbone_spec(name).num_blocks >= 4
    model = Classifier(backbone, 3)
    set_trainable(model, 0)
    assert _trainable(model) == {"head.weight", "head.bias"}


def test_frozen_batchnorm_stays_in_eval_mode_in_training():
    """A CNN's frozen stages keep their BatchNorm statistics: eval mode while training."""
    model = Classifier(build_backbone(RESNET, "none"), 3)
    frozen = set_trainable(model, 1)
    train_mode(model, frozen, bn="train")
    inner = model.backbone.model
    assert not inner.layer1.training and not inner.bn1.training
    assert inner.layer4.training  # the unfrozen stage trains (bn: train)
    before = inner.layer1[0].bn1.running_mean.clone()
    model(torch.rand(2, 3, 64, 64)).sum().backward()
    assert torch.equal(inner.layer1[0].bn1.running_mean, before)


def test_features_are_timms_pre_logits():
    backbone = build_backbone(VIT, "none")
    images = torch.rand(2, 3, 160, 160)
    inner = backbone.model.eval()
    with torch.no_grad():
        expected = inner.forward_head(inner.forward_features(images), pre_logits=True)
        assert torch.equal(backbone.eval()(images), expected)
    assert expected.shape == (2, backbone.num_features)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("with_classifier", [True, False])
def test_a_local_weights_file_gives_the_features_of_the_same_weights_in_memory(
    tmp_path, suffix, with_classifier
):
    """A state dict saved to disk (with or without its ImageNet classifier), loaded through
    backbone.weights, gives exactly the features of the model it was saved from; the rebuilt
    classifier loads into the architecture that predict builds from the file's metadata."""
    torch.manual_seed(7)
    source = timm.create_model(RESNET.removeprefix("timm:"), num_classes=1000).eval()
    state = source.state_dict()
    if not with_classifier:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    path = tmp_path / "pretrained" / f"resnet{suffix}"
    path.parent.mkdir()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)

    loaded = build_backbone(RESNET, str(path)).eval()
    images = torch.rand(3, 3, 96, 96)
    with torch.no_grad():
        expected = source.forward_head(source.forward_features(images), pre_logits=True)
        assert torch.equal(loaded(images), expected)
    rebuilt = Classifier(build_backbone(RESNET, "none"), 3)
    rebuilt.load_state_dict(Classifier(loaded, 3).state_dict())  # strict: same keys, shapes


def test_weights_of_another_model_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "vit.safetensors"
    from safetensors.torch import save_file

    save_file(timm.create_model("test_vit", num_classes=0).state_dict(), path)
    with pytest.raises(ArtifactError, match=r"vit\.safetensors: its tensors do not fit timm:"):
        build_backbone(RESNET, str(path))


def test_offline_pretrained_is_one_line_naming_the_file_and_the_fix(tmp_path, monkeypatch):
    """No internet, nothing in the hub cache: one line with the URL to fetch, where to put it
    and the param to set; at once, not after the hub client's minute of retries."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MissingFileError) as caught:
        build_backbone(VIT, "pretrained")
    message = str(caught.value)
    assert "\n" not in message
    assert "https://huggingface.co/timm/test_vit.r160_in1k/resolve/main/model.safetensors" in (
        message
    )
    assert "pretrained/test_vit.r160_in1k.safetensors" in message
    assert "backbone.weights: pretrained/test_vit.r160_in1k.safetensors" in message


def test_unreachable_hub_without_the_offline_flag_fails_at_once(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(timm_backbones, "_hub_reachable", lambda: False)
    with pytest.raises(MissingFileError, match="cannot be reached"):
        build_backbone(CONVNEXT, "pretrained")


def _params(params_dict, **backbone):
    params_dict["backbone"].update(backbone)
    return parse_params(params_dict)


def test_a_fixed_size_vit_takes_auto_or_its_size_and_refuses_others(params_dict):
    assert _params(params_dict, name=VIT, image_size="auto").backbone.image_size == "auto"
    _params(params_dict, name=VIT, image_size=160)
    with pytest.raises(ParamsError, match=r"backbone.image_size: .* takes 160 px only; set it to"):
        _params(params_dict, name=VIT, image_size=224)
    _params(params_dict, name=CONVNEXT, image_size=96)  # a CNN takes any size


def test_unknown_timm_names_and_tags_are_params_errors_with_suggestions(params_dict):
    with pytest.raises(ParamsError, match=r"not a timm model; did you mean .*convnext_tiny"):
        _params(params_dict, name="timm:convnext_tiyn")
    with pytest.raises(ParamsError, match=r"Invalid pretrained tag .* Tags it has: .*a1_in1k"):
        _params(params_dict, name="timm:resnet50.no_such_tag")
    params_dict["finetune"]["unfreeze"] = 7
    with pytest.raises(ParamsError, match=r"finetune.unfreeze: 7 is more blocks .* \(6\)"):
        _params(params_dict, name=VIT, image_size="auto")


def test_torchvision_weight_names_are_refused_for_timm():
    with pytest.raises(ParamsError, match="torchvision weights name"):
        build_backbone(RESNET, "ResNet18_Weights.IMAGENET1K_V1")


def test_the_spec_takes_timms_data_config():
    spec = backbone_spec(RESNET)
    assert (spec.default_size, spec.interpolation, spec.crop_pct) == (160, "bilinear", 0.95)
    assert spec.mean == (0.5, 0.5, 0.5) and not spec.fixed_size
    assert backbone_spec(VIT).fixed_size
