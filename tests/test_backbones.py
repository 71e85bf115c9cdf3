"""Weights specs: shipped file, local file, torchvision's cache (offline), refusals."""

from __future__ import annotations

import hashlib
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision

from headstart import backbones
from headstart.backbone_specs import BACKBONES
from headstart.backbones import build_backbone, load_state_dict_file


def test_efficientnet_lite0_pretrained_loads_the_shipped_file():
    shipped = load_state_dict_file(backbones._lite_weights_file(0))
    backbone = build_backbone("efficientnet_lite0", "pretrained")
    stem_conv = backbone.stem[0]
    assert torch.equal(stem_conv.weight, shipped["_conv_stem.weight"])
    head_conv = backbone.blocks[-1][0]
    assert torch.equal(head_conv.weight, shipped["_conv_head.weight"])


def test_local_weights_file_is_loaded(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-local.pth"
    torch.save(source.state_dict(), path)
    backbone = build_backbone("resnet18", str(path))
    assert torch.equal(backbone.blocks[-1][0].conv1.weight, source.layer4[0].conv1.weight)
    random_init = build_backbone("resnet18", "none")
    assert not torch.equal(random_init.blocks[-1][0].conv1.weight, source.layer4[0].conv1.weight)


def test_missing_local_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        build_backbone("resnet18", str(tmp_path / "nothere.pth"))


def _entry_for(tmp_path: Path, state: dict) -> tuple[SimpleNamespace, bytes]:
    blob_path = tmp_path / "blob.pth"
    torch.save(state, blob_path)
    blob = blob_path.read_bytes()
    prefix = hashlib.sha256(blob).hexdigest()[:8]
    return SimpleNamespace(url=f"https://download.invalid/tiny-{prefix}.pth"), blob


def test_offline_cached_file_with_matching_hash_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    state = {"weight": torch.arange(6.0).reshape(2, 3)}
    entry, blob = _entry_for(tmp_path, state)
    cached = tmp_path / "hub" / "checkpoints" / Path(entry.url).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(blob)

    def no_network(*args, **kwargs):
        raise AssertionError("a cached file must not be downloaded again")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    loaded = backbones._download_state_dict(entry)
    assert torch.equal(loaded["weight"], state["weight"])


def test_offline_cached_file_with_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    entry, _ = _entry_for(tmp_path, {"weight": torch.zeros(2)})
    cached = tmp_path / "hub" / "checkpoints" / Path(entry.url).name
    cached.parent.mkdir(parents=True)
    torch.save({"weight": torch.ones(2)}, cached)  # different bytes under the expected name
    with pytest.raises(ValueError, match="does not match the .* in its name"):
        backbones._download_state_dict(entry)


def test_offline_without_file_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as error:
        build_backbone("resnet18", "pretrained")
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in str(error.value)
    assert "pretrained/" in str(error.value)


def test_weights_enum_of_another_family_is_refused():
    with pytest.raises(ValueError, match="ResNet18_Weights.IMAGENET1K_V1"):
        build_backbone("resnet18", "ResNet50_Weights.IMAGENET1K_V2")


def test_local_file_named_with_a_hash_is_checked_before_loading(tmp_path):
    """A hub-style name (`name-<sha256 prefix>.pth`) promises content; a mismatch is refused."""
    torch.manual_seed(2)
    source = torchvision.models.resnet18(weights=None)
    blob = tmp_path / "blob.pth"
    torch.save(source.state_dict(), blob)
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    good = tmp_path / f"resnet18-{digest[:8]}.pth"
    blob.rename(good)
    build_backbone("resnet18", str(good))  # matches: loads
    bad = tmp_path / "resnet18-00000000.pth"
    good.rename(bad)
    with pytest.raises(ValueError, match="resnet18-00000000.pth.*does not match"):
        build_backbone("resnet18", str(bad))


def test_shipped_lite0_file_matches_the_hash_in_its_name():
    path = backbones._lite_weights_file(0)
    assert backbones._hash_prefix(path.name) == "57934424"
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith("57934424")


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_registry_block_count_matches_the_built_network(name):
    """params.yaml checks finetune.unfreeze against num_blocks before any stage builds a net."""
    built = build_backbone(name, "none")
    assert len(built.blocks) == BACKBONES[name].num_blocks
