"""Backbones, model surgery, the training loop and artefacts, on tiny random-init models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from headstart.backbones import build_backbone, load_state_dict_file
from headstart.checkpoints import load_checkpoint, save_checkpoint
from headstart.heads import fit_logreg
from headstart.inference import FlipTTA, cache_activations, run_inference, with_tta
from headstart.io import ArrayWriter, atomic_path, open_array, write_array, write_json
from headstart.model import (
    Classifier,
    load_classifier,
    load_head,
    param_groups,
    set_trainable,
    split_at_cut,
    train_mode,
)
from headstart.runtime import cpu_has_native_bf16, resolve_precision, set_threads
from headstart.train import fit

BACKBONE_NAMES = ["efficientnet_lite0", "resnet18", "mobilenet_v3_small", "convnext_tiny"]
# Families with BatchNorm (ConvNeXt uses LayerNorm).
BN_BACKBONES = ["efficientnet_lite0", "resnet18", "mobilenet_v3_small"]
NUM_CLASSES = 3
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def classifiers() -> dict[str, Classifier]:
    """One random-init classifier per family, built once (surgery resets requires_grad)."""
    torch.manual_seed(0)
    return {name: Classifier(build_backbone(name, "none"), NUM_CLASSES) for name in BACKBONE_NAMES}


def _images(batch: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _trainable(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def _ids(*modules: nn.Module) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


# --------------------------------------------------------------------------------------------
# Backbones and surgery


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_backbone_output_shape(classifiers, name):
    model = classifiers[name].eval()
    with torch.inference_mode():
        features = model.backbone(_images(batch=2))
        logits = model(_images(batch=2))
    assert features.shape == (2, model.backbone.num_features)
    assert logits.shape == (2, NUM_CLASSES)
    assert model.head.in_features == model.backbone.num_features
    assert torch.isfinite(features).all()


# Blocks per family: the stages named in headstart.backbones (an EfficientNet's final 1x1 conv
# counts as one).
EXPECTED_BLOCKS = {"efficientnet_lite0": 8, "efficientnet_b0": 8, "resnet18": 4, "convnext_tiny": 4}


@pytest.mark.parametrize("name", [*BACKBONE_NAMES, "efficientnet_b0"])
def test_blocks_are_whole_stages(classifiers, name):
    """finetune.unfreeze counts blocks, documented as "the last two stages of the network in
    every family" for unfreeze 2. A stage ends where the width changes, so two neighbouring
    blocks never have the same output width."""
    if name in classifiers:
        backbone = classifiers[name].backbone
    else:
        torch.manual_seed(0)
        backbone = build_backbone(name, "none")
    widths: list[int] = []
    hooks = [
        block.register_forward_hook(lambda module, inputs, output: widths.append(output.shape[1]))
        for block in backbone.blocks
    ]
    try:
        with torch.inference_mode():
            backbone.eval()(_images(batch=1, size=64))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(widths) == len(backbone.blocks)
    assert widths[-1] == backbone.num_features
    if name in EXPECTED_BLOCKS:
        assert len(backbone.blocks) == EXPECTED_BLOCKS[name], widths
    repeated = [i for i in range(len(widths) - 1) if widths[i] == widths[i + 1]]
    assert repeated == [], f"{name}: blocks {repeated} split a stage; block widths {widths}"


def test_unknown_backbone_raises():
    with pytest.raises(ValueError, match="resnet19"):
        build_backbone("resnet19", "none")


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_unfreeze_zero_trains_only_the_head(classifiers, name):
    model = classifiers[name]
    frozen = set_trainable(model, 0)
    assert _trainable(model) == _ids(model.head)
    assert model.backbone.stem in frozen
    assert model.backbone.neck in frozen
    assert all(block in frozen for block in model.backbone.blocks)


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_unfreeze_k_trains_top_blocks_head_and_neck(classifiers, name):
    model = classifiers[name]
    blocks = list(model.backbone.blocks)
    for k in sorted({1, 2, len(blocks)}):
        frozen = set_trainable(model, k)
        expected = _ids(model.head, model.backbone.neck, *blocks[len(blocks) - k :])
        assert _trainable(model) == expected, k
        assert frozen == [model.backbone.stem, *blocks[: len(blocks) - k]], k
        # The stem never trains, so at least one parameter stays frozen.
        assert any(not p.requires_grad for p in model.backbone.stem.parameters())


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_unfreeze_more_than_blocks_names_the_key(classifiers, name):
    model = classifiers[name]
    with pytest.raises(ValueError, match=r"finetune\.unfreeze"):
        set_trainable(model, len(model.backbone.blocks) + 1)


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: buffer.clone()
        for name, buffer in model.named_buffers()
        if name.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def _one_step(model: Classifier, frozen, bn: str) -> None:
    optimizer = torch.optim.AdamW(param_groups(model, 1.0e-2, 1.0e-2, 0.0))
    train_mode(model, frozen, bn)
    loss = nn.functional.cross_entropy(model(_images(batch=4)), torch.tensor([0, 1, 2, 0]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("name", BN_BACKBONES)
def test_frozen_bn_statistics_survive_a_training_step(name):
    torch.manual_seed(0)
    model = Classifier(build_backbone(name, "none"), NUM_CLASSES)
    frozen = set_trainable(model, 2)
    buffers = _bn_buffers(model)
    assert buffers
    top_before = [p.detach().clone() for p in model.backbone.blocks[-1].parameters()]
    stem_before = [p.detach().clone() for p in model.backbone.stem.parameters()]
    head_before = model.head.weight.detach().clone()

    _one_step(model, frozen, "frozen")

    for key, value in _bn_buffers(model).items():
        assert torch.equal(value, buffers[key]), key
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert not module.training
    assert model.head.training  # train_mode did put the rest in training mode
    assert not torch.equal(model.head.weight, head_before)
    top_after = list(model.backbone.blocks[-1].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(top_after, top_before, strict=True))
    stem_after = list(model.backbone.stem.parameters())
    assert all(torch.equal(a, b) for a, b in zip(stem_after, stem_before, strict=True))


@pytest.mark.parametrize("name", BN_BACKBONES)
def test_bn_train_updates_only_trainable_blocks(name):
    """The contrast: with bn='train' the top blocks re-estimate statistics, frozen ones don't."""
    torch.manual_seed(0)
    model = Classifier(build_backbone(name, "none"), NUM_CLASSES)
    frozen = set_trainable(model, 1)
    buffers = _bn_buffers(model)

    _one_step(model, frozen, "train")

    after = _bn_buffers(model)
    top = f"backbone.blocks.{len(model.backbone.blocks) - 1}."
    changed = {key for key in buffers if not torch.equal(after[key], buffers[key])}
    assert changed, "no BatchNorm statistic moved in the trainable block"
    assert all(key.startswith(top) for key in changed), sorted(changed)


@pytest.mark.parametrize("unfreeze", [0, 2])
def test_param_groups_hold_only_trainable_params_with_their_lr(classifiers, unfreeze):
    model = classifiers["resnet18"]
    set_trainable(model, unfreeze)
    groups = param_groups(model, lr_head=1.0e-2, lr_backbone=1.0e-4, weight_decay=0.05)

    in_groups = [id(p) for g in groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups))  # no parameter twice
    assert set(in_groups) == _trainable(model)
    head_ids = _ids(model.head)
    for group in groups:
        assert "lr" in group
        ids = {id(p) for p in group["params"]}
        if group["name"].startswith("head"):
            assert group["lr"] == 1.0e-2 and ids <= head_ids
        else:
            assert group["lr"] == 1.0e-4 and ids.isdisjoint(head_ids)
        if group["name"].endswith("_no_decay"):
            assert group["weight_decay"] == 0.0
            assert all(p.ndim <= 1 for p in group["params"])
        else:
            assert group["weight_decay"] == 0.05
            assert all(p.ndim > 1 for p in group["params"])
    names = {g["name"] for g in groups}
    assert ("backbone" in names) == (unfreeze > 0)
    torch.optim.AdamW(groups)  # the optimizer accepts them as they are


# --------------------------------------------------------------------------------------------
# The training loop


def _clusters(n_per_class: int, seed: int, dims: int = 8, spread: float = 1.0):
    """Gaussian clusters around fixed, well-separated centres: (x (N, D) float32, y (N,))."""
    centres = np.random.default_rng(123).normal(0.0, 4.0, (NUM_CLASSES, dims))
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(NUM_CLASSES), n_per_class)
    x = centres[y] + rng.normal(0.0, spread, (len(y), dims))
    return x.astype(np.float32), y.astype(np.int64)


def _loaders(spread: float = 3.0, val_shift: int = 0):
    """Shuffled training batches and validation batches of overlapping clusters; val_shift
    relabels validation class c as c + val_shift, so that learning the training labels hurts."""
    train_x, train_y = _clusters(40, seed=1, spread=spread)
    val_x, val_y = _clusters(20, seed=2, spread=spread)
    val_y = (val_y + val_shift) % NUM_CLASSES
    train = DataLoader(
        TensorDataset(torch.from_numpy(train_x), torch.from_numpy(train_y)),
        batch_size=16,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    val = DataLoader(TensorDataset(torch.from_numpy(val_x), torch.from_numpy(val_y)), 64)
    return train, val


def _linear_group(head: nn.Linear, lr: float) -> list[dict]:
    return [{"params": list(head.parameters()), "lr": lr, "weight_decay": 0.0}]


def test_fit_decreases_the_loss_and_keeps_the_best_epoch():
    torch.manual_seed(0)
    head = nn.Linear(8, NUM_CLASSES)
    train, val = _loaders()
    seen = []
    result = fit(
        head,
        train,
        val,
        _linear_group(head, 0.01),
        epochs=8,
        patience=100,
        label_smoothing=0.0,
        device=CPU,
        on_epoch=seen.append,
    )
    history = result.history
    assert [r["epoch"] for r in history] == list(range(1, 9))
    assert seen == history
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["train_accuracy"] > history[0]["train_accuracy"]
    assert result.best_val_accuracy >= 0.85
    best = max(history, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert result.best_epoch == best["epoch"]
    assert result.best_val_accuracy == best["val_accuracy"]
    # The best epoch's weights are the ones left in the model.
    for key, value in head.state_dict().items():
        assert torch.equal(value, result.state_dict[key]), key
    loss, accuracy = _val_loss_accuracy(head, val)
    assert accuracy == pytest.approx(result.best_val_accuracy)
    assert loss == pytest.approx(result.best_val_loss, rel=1e-5)


def test_fit_restores_an_earlier_best_epoch():
    """Validation labels contradict the training labels, so validation gets worse as the loss
    goes down: the model must end with the first epoch's weights, not the last."""
    torch.manual_seed(0)
    head = nn.Linear(8, NUM_CLASSES)
    train, val = _loaders(val_shift=1)
    snapshots = []
    result = fit(
        head,
        train,
        val,
        _linear_group(head, 0.003),
        epochs=6,
        patience=100,
        label_smoothing=0.0,
        device=CPU,
        on_epoch=lambda record: snapshots.append(head.weight.detach().clone()),
    )
    assert len(result.history) == len(snapshots) == 6
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_epoch == 1
    assert result.history[-1]["val_accuracy"] < result.best_val_accuracy
    assert torch.equal(head.weight, snapshots[0])
    assert not torch.equal(head.weight, snapshots[-1])


@pytest.mark.parametrize("val_shift", [0, 1])
def test_fit_with_validate_start_never_returns_worse_than_the_start(val_shift):
    """LP-FT's guarantee: a head trained on the validation labels is the start; training on
    contradicting labels (val_shift 1) only hurts it, so no epoch beats epoch 0 and the start
    comes back, weights and predictions unchanged. When training helps (val_shift 0 from a
    random start), an epoch wins as before."""
    torch.manual_seed(0)
    head = nn.Linear(8, NUM_CLASSES)
    train, val = _loaders(val_shift=val_shift)
    if val_shift:  # the start: fitted to the validation labels themselves
        fit(
            head,
            val,
            val,
            _linear_group(head, 0.05),
            epochs=30,
            patience=100,
            label_smoothing=0.0,
            device=CPU,
        )
    start = {k: v.clone() for k, v in head.state_dict().items()}
    start_logits, _ = run_inference(head, val, CPU)
    _, start_accuracy = _val_loss_accuracy(head, val)

    result = fit(
        head,
        train,
        val,
        _linear_group(head, 0.01),
        epochs=5,
        patience=100,
        label_smoothing=0.0,
        device=CPU,
        validate_start=True,
    )
    assert result.start_val_accuracy == pytest.approx(start_accuracy)
    if val_shift:
        assert start_accuracy >= 0.8
        assert max(r["val_accuracy"] for r in result.history) < start_accuracy
        assert result.best_epoch == 0
        for key, value in head.state_dict().items():
            assert torch.equal(value, start[key]), key
        logits, _ = run_inference(head, val, CPU)
        assert np.array_equal(logits, start_logits)
    else:
        assert result.best_epoch >= 1
        assert result.best_val_accuracy > start_accuracy


def _val_loss_accuracy(model: nn.Module, val) -> tuple[float, float]:
    logits, labels = run_inference(model, val, CPU)
    loss = nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))
    return loss.item(), float((logits.argmax(1) == labels).mean())


def test_fit_stops_early_without_improvement():
    torch.manual_seed(0)
    head = nn.Linear(8, NUM_CLASSES)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    train, val = _loaders()
    # lr 0: validation never improves after the first epoch.
    result = fit(
        head,
        train,
        val,
        _linear_group(head, 0.0),
        epochs=20,
        patience=2,
        label_smoothing=0.0,
        device=CPU,
    )
    assert len(result.history) == 3
    assert result.best_epoch == 1
    for key, value in head.state_dict().items():
        assert torch.equal(value, before[key])


def test_fit_refuses_nothing_to_train():
    head = nn.Linear(8, NUM_CLASSES).requires_grad_(False)
    train, val = _loaders()
    with pytest.raises(ValueError, match="nothing to train"):
        fit(
            head,
            train,
            val,
            [{"params": list(head.parameters()), "lr": 0.1}],
            epochs=1,
            patience=1,
            label_smoothing=0.0,
            device=CPU,
        )


def test_fit_logreg_head_takes_raw_features():
    # Overlapping clusters, far from zero and on very different scales: a head that forgot
    # to fold the standardisation back into its weights would predict something else.
    train_x, train_y = _clusters(40, seed=1, spread=4.0)
    val_x, val_y = _clusters(30, seed=2, spread=4.0)
    scale = np.geomspace(0.1, 100.0, train_x.shape[1]).astype(np.float32)
    train_x, val_x = train_x * scale + 50.0, val_x * scale + 50.0
    candidates = []
    head, summary = fit_logreg(
        train_x, train_y, val_x, val_y, NUM_CLASSES, seed=0, on_candidate=candidates.append
    )
    assert isinstance(head, nn.Linear)
    assert (head.in_features, head.out_features) == (train_x.shape[1], NUM_CLASSES)
    assert [c["C"] for c in candidates] == [0.001, 0.01, 0.1, 1.0, 10.0]
    assert summary["best_val_accuracy"] == max(c["val_accuracy"] for c in candidates)
    assert 0.5 < summary["best_val_accuracy"] < 1.0  # informative, not trivial
    with torch.no_grad():
        predicted = head(torch.from_numpy(val_x)).argmax(1).numpy()
    assert float((predicted == val_y).mean()) == pytest.approx(summary["best_val_accuracy"])


# --------------------------------------------------------------------------------------------
# Checkpoints and files


def test_head_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    head = nn.Linear(16, NUM_CLASSES)
    preprocessing = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    meta = {
        "kind": "head",
        "in_features": 16,
        "classes": ["bird", "cat", "dog"],
        "features_meta": {"num_features": 16, **preprocessing},
    }
    save_checkpoint(tmp_path / "head.pt", head.state_dict(), meta)
    loaded, loaded_meta = load_head(tmp_path / "head.pt")
    assert loaded_meta == meta
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), head(x))
    assert not loaded.training


def test_classifier_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Classifier(build_backbone("mobilenet_v3_small", "none"), NUM_CLASSES).eval()
    meta = {
        "kind": "classifier",
        "backbone": "mobilenet_v3_small",
        "num_features": model.backbone.num_features,
        "classes": ["a", "b", "c"],
        "image_size": 32,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    save_checkpoint(tmp_path / "model.pt", model.state_dict(), meta)
    torch.manual_seed(1)  # the rebuilt model starts from other random weights
    loaded, loaded_meta = load_classifier(tmp_path / "model.pt")
    assert loaded_meta == meta
    assert not loaded.training
    with torch.inference_mode():
        assert torch.equal(loaded(_images(batch=2)), model(_images(batch=2)))


def test_checkpoint_kind_is_checked(tmp_path):
    head = nn.Linear(4, 2)
    save_checkpoint(tmp_path / "head.pt", head.state_dict(), {"kind": "head"})
    with pytest.raises(ValueError, match="not a classifier checkpoint"):
        load_classifier(tmp_path / "head.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_head(tmp_path / "missing.pt")


class _Payload:
    """Unpickling this creates a file: the shape of a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"format": 1, "state_dict": {"w": _Payload(marker)}, "meta": {}}, path)
    return path


def test_malicious_pickle_payload_is_live(tmp_path):
    """The control: loading the file the unsafe way does create the marker."""
    marker = tmp_path / "MARKER"
    path = _malicious_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("force_unsafe", [False, True])
def test_load_checkpoint_refuses_malicious_pickle(tmp_path, monkeypatch, force_unsafe):
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "MARKER"
    path = _malicious_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="evil.pt.*not loadable as plain weights"):
        load_state_dict_file(path)
    assert not marker.exists()


def test_write_json_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "out" / "metrics.json"
    write_json(path, {"accuracy": 0.5})
    write_json(path, {"accuracy": 0.75})
    assert os.listdir(path.parent) == ["metrics.json"]
    assert path.read_text(encoding="utf-8") == '{\n  "accuracy": 0.75\n}\n'


def test_failed_atomic_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"accuracy": 0.5})
    previous = path.read_bytes()
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(path) as tmp:
            assert tmp.parent == path.parent and tmp != path
            tmp.write_text('{"accuracy": ', encoding="utf-8")  # half-written
            raise RuntimeError("interrupted")
    assert path.read_bytes() == previous
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_checkpoint_bytes_do_not_depend_on_the_file_name(tmp_path):
    """DVC skips downstream stages only when outputs are byte-identical across reruns."""
    torch.manual_seed(0)
    head = nn.Linear(4, 3)
    first, second = tmp_path / "a" / "head.pt", tmp_path / "b" / "other.pt"
    save_checkpoint(first, head.state_dict(), {"kind": "head", "classes": ["x", "y", "z"]})
    save_checkpoint(second, head.state_dict(), {"kind": "head", "classes": ["x", "y", "z"]})
    assert first.read_bytes() == second.read_bytes()


def test_precision_resolution():
    assert resolve_precision("float32", CPU) is None
    assert resolve_precision("bfloat16", CPU) is torch.bfloat16
    assert resolve_precision("float16", CPU) is torch.float16
    # auto: bfloat16 on CPUs with native support, float32 on the others.
    assert resolve_precision("auto", CPU) is (torch.bfloat16 if cpu_has_native_bf16() else None)
    # Training steps on a CPU stay float32 under auto (bfloat16 was no faster there).
    assert resolve_precision("auto", CPU, training=True) is None
    assert resolve_precision("bfloat16", CPU, training=True) is torch.bfloat16


def test_set_threads():
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads("auto")  # leaves the count alone
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_bfloat16_autocast_trains_and_keeps_float32_weights():
    """The fast path: a conv net trained and run under bfloat16 autocast, channels-last.
    Weights stay float32; outputs come back float32 and close to a float32 run."""
    torch.manual_seed(0)
    model = Classifier(build_backbone("resnet18", "none"), NUM_CLASSES)
    set_trainable(model, 1)
    images = torch.randn(16, 3, 32, 32)
    labels = torch.arange(16) % NUM_CLASSES
    batches = DataLoader(TensorDataset(images, labels), batch_size=8)
    reference, _ = run_inference(model, batches, CPU)
    fast, _ = run_inference(model, batches, CPU, precision=torch.bfloat16)
    assert fast.dtype == np.float32
    assert np.abs(fast - reference).max() < 0.05 * np.abs(reference).max() + 0.05
    result = fit(
        model,
        batches,
        batches,
        param_groups(model, 1e-2, 1e-3, 0.0),
        epochs=3,
        patience=3,
        label_smoothing=0.0,
        device=CPU,
        precision=torch.bfloat16,
    )
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_open_array_writes_the_bytes_np_save_writes(tmp_path):
    """Features streamed into a memory-mapped .npy are byte-identical to np.save's file."""
    values = np.random.default_rng(0).standard_normal((37, 5)).astype(np.float32)
    streamed = open_array(tmp_path / "streamed.npy", values.shape, np.float32)
    for start in range(0, len(values), 8):
        streamed[start : start + 8] = values[start : start + 8]
    streamed.flush()
    del streamed
    write_array(tmp_path / "saved.npy", values)
    assert (tmp_path / "streamed.npy").read_bytes() == (tmp_path / "saved.npy").read_bytes()


@pytest.mark.parametrize(("name", "unfreeze"), [("resnet18", 1), ("efficientnet_lite0", 3)])
def test_split_at_cut_composes_to_the_model_and_shares_its_weights(name, unfreeze):
    torch.manual_seed(0)
    model = Classifier(build_backbone(name, "none"), NUM_CLASSES).eval()
    bottom, top = split_at_cut(model, unfreeze)
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(top(bottom(images)), model(images))
    shared = {id(p) for p in model.parameters()}
    assert {id(p) for p in top.parameters()} | {id(p) for p in bottom.parameters()} == shared
    top_blocks = list(model.backbone.blocks)[len(model.backbone.blocks) - unfreeze :]
    assert list(top.blocks) == top_blocks


def test_fine_tuning_from_cached_activations_matches_the_full_path(tmp_path):
    """Without augmentation, training the top blocks on activations cached once at the cut is
    the same computation as running the whole backbone every epoch: same batches in the same
    order (one seeded generator), same weights at the end up to float rounding."""
    images = torch.randn(48, 3, 32, 32)
    labels = torch.arange(48) % NUM_CLASSES
    options = {"epochs": 3, "patience": 3, "label_smoothing": 0.1, "device": CPU}

    def trained(cached: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = Classifier(build_backbone("resnet18", "none"), NUM_CLASSES)
        frozen = set_trainable(model, 1)
        groups = param_groups(model, 1e-2, 1e-3, 1e-4)
        dataset = TensorDataset(images, labels)
        if cached:
            bottom, trainee = split_at_cut(model, 1)
            ordered = DataLoader(dataset, batch_size=16)
            dataset = cache_activations(bottom, ordered, CPU, tmp_path / "a.npy", "cache")
            assert dataset.tensors[0].shape == (48, 256, 2, 2)  # resnet18's layer3 at 32 px
        else:
            trainee = model
        train = DataLoader(dataset, 16, shuffle=True, generator=torch.Generator().manual_seed(0))
        val = DataLoader(dataset, 16)
        fit(
            trainee,
            train,
            val,
            groups,
            train_mode=lambda _: train_mode(model, frozen, "frozen"),
            **options,
        )
        return {k: v.clone() for k, v in model.state_dict().items()}

    full, cached = trained(cached=False), trained(cached=True)
    assert any(not torch.equal(full[k], v) for k, v in _initial_resnet18().items())
    for key, value in full.items():
        torch.testing.assert_close(cached[key], value, atol=1e-4, rtol=1e-4, msg=key)


def _initial_resnet18() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return Classifier(build_backbone("resnet18", "none"), NUM_CLASSES).state_dict()


def test_array_writer_writes_the_bytes_np_save_writes(tmp_path):
    values = np.random.default_rng(1).standard_normal((37, 5)).astype(np.float32)
    with ArrayWriter(tmp_path / "written.npy", values.shape, np.float32) as out:
        for start in range(0, len(values), 8):
            out.write(values[start : start + 8])
    write_array(tmp_path / "saved.npy", values)
    assert (tmp_path / "written.npy").read_bytes() == (tmp_path / "saved.npy").read_bytes()
    with pytest.raises(ValueError, match="36 rows written, 37 expected"):
        with ArrayWriter(tmp_path / "short.npy", values.shape, np.float32) as out:
            out.write(values[:36])
    with pytest.raises(ValueError, match="do not fit"):
        with ArrayWriter(tmp_path / "wide.npy", (3, 4), np.float32) as out:
            out.write(values[:3])


def test_tensor_batches_are_the_tensor_dataset_loaders_batches():
    """tensor_batches gives the batches DataLoader(TensorDataset) gives, in the same order
    epoch after epoch, and leaves the generator where that loader leaves it: the head trains
    the same with either."""
    from torch.utils.data import DataLoader, TensorDataset

    from headstart.loaders import tensor_batches

    x, y = torch.randn(103, 5), torch.arange(103)
    for shuffle in (True, False):
        ours = tensor_batches(x, y, 16, shuffle, torch.Generator().manual_seed(4))
        usual_generator = torch.Generator().manual_seed(4)
        usual = DataLoader(
            TensorDataset(x, y), batch_size=16, shuffle=shuffle, generator=usual_generator
        )
        assert len(ours) == len(usual) == 7
        for _ in range(3):  # epochs
            pairs = list(zip(ours, usual, strict=True))
            for (our_x, our_y), (usual_x, usual_y) in pairs:
                assert torch.equal(our_x, usual_x) and torch.equal(our_y, usual_y)
        assert torch.equal(ours.generator.get_state(), usual_generator.get_state())
    first_epoch = torch.cat([labels for _, labels in ours])
    assert first_epoch.tolist() == list(range(103))  # unshuffled: in order


def test_balanced_class_weight_is_scikit_learns_and_fit_trains_on_the_weighted_loss():
    """class_weight: balanced gives N / (C x count) per class; fit's training loss is then the
    weighted cross-entropy, checked by hand on one batch with lr 0 (the weights never move)."""
    from sklearn.utils.class_weight import compute_class_weight

    from headstart.train import balanced_class_weight

    labels = np.array([0, 0, 0, 1, 2, 2])
    weight = balanced_class_weight(labels, 3, "balanced")
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    assert torch.allclose(weight, torch.tensor(expected, dtype=torch.float32))
    assert balanced_class_weight(labels, 3, "none") is None

    torch.manual_seed(0)
    head = nn.Linear(4, 3)
    x = torch.randn(6, 4)
    y = torch.from_numpy(labels)
    batches = DataLoader(TensorDataset(x, y), batch_size=6)
    result = fit(
        head,
        batches,
        batches,
        _linear_group(head, 0.0),
        epochs=1,
        patience=1,
        label_smoothing=0.0,
        device=CPU,
        class_weight=weight,
    )
    with torch.no_grad():
        nll = -torch.log_softmax(head(x), dim=1)[torch.arange(6), y]
    by_hand = float((weight[y] * nll).sum() / weight[y].sum())
    assert result.history[0]["train_loss"] == pytest.approx(by_hand, rel=1e-6)
    assert result.history[0]["train_loss"] != pytest.approx(float(nll.mean()), rel=1e-3)


def _tiny_convnet() -> nn.Module:
    """A random-init classifier on (B, 3, 8, 8) images that tells left from right."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, NUM_CLASSES)
    )


class _MirrorSymmetric(nn.Module):
    """`inner` on the mean of the image and its horizontal mirror: the same logits for both."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner((images + images.flip(3)) / 2)


def _image_batches(images: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(images, torch.zeros(len(images), dtype=torch.long)), 4)


def test_flip_tta_changes_nothing_for_a_mirror_symmetric_model():
    """Symmetric left-right (not up-down): flip TTA must give its logits unchanged, so the
    wrapper mirrors the width axis, nothing else."""
    model = _MirrorSymmetric(_tiny_convnet())
    images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    plain, _ = run_inference(model, _image_batches(images), CPU)
    upside_down, _ = run_inference(model, _image_batches(images.flip(2)), CPU)
    assert np.abs(upside_down - plain).max() > 1e-3  # not symmetric up-down: the test can fail
    flipped, _ = run_inference(FlipTTA(model), _image_batches(images), CPU)
    np.testing.assert_allclose(flipped, plain, atol=1e-6)
    assert with_tta(model, "none") is model
    with pytest.raises(ValueError, match="expected one of none, flip"):
        with_tta(model, "rotate")


def test_flip_tta_is_the_mean_of_the_image_and_mirror_logits():
    model = _tiny_convnet()
    images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    plain, _ = run_inference(model, _image_batches(images), CPU)
    mirror, _ = run_inference(model, _image_batches(images.flip(3)), CPU)
    assert np.abs(mirror - plain).max() > 1e-3  # the model tells a mirror apart
    got, _ = run_inference(with_tta(model, "flip"), _image_batches(images), CPU)
    np.testing.assert_allclose(got, (plain + mirror) / 2, atol=1e-6)
