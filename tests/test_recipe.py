"""The training recipe's pieces: the val metric that picks the epoch, weight EMA, layer-wise
learning-rate decay, MixUp/CutMix, stochastic depth, the balanced sampler and the photo
augmentation policies; tiny models and tensors, real torch and torchvision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from headstart import loaders
from headstart.backbones import build_backbone
from headstart.distributed import World
from headstart.errors import ParamsError
from headstart.inference import validation_scores
from headstart.model import Classifier, param_groups, set_trainable
from headstart.params import parse_params
from headstart.train import fit
from headstart.transforms import batch_mix, train_transform

CPU = torch.device("cpu")


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int = 8, seed: int | None = None):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=seed is not None, generator=generator
    )


def _skewed(seed: int = 0):
    """Three overlapping 2-d clusters, 60/15/5 images: accuracy and balanced accuracy part."""
    rng = np.random.default_rng(seed)
    counts = (60, 15, 5)
    y = np.repeat(np.arange(3), counts)
    centres = np.array([[0.0, 0.0], [1.2, 0.0], [0.0, 1.2]])
    x = centres[y] + rng.normal(0.0, 0.7, (len(y), 2))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def test_validation_scores_are_scikit_learns():
    torch.manual_seed(0)
    model = nn.Linear(2, 3)
    x, y = _skewed()
    scores = validation_scores(model, _batches(x, y, batch_size=7), CPU)
    with torch.no_grad():
        logits = model(x)
    predicted = logits.argmax(1).numpy()
    assert scores["accuracy"] == pytest.approx(accuracy_score(y, predicted), abs=1e-12)
    assert scores["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(y, predicted), abs=1e-12
    )
    expected_f1 = f1_score(y, predicted, labels=[0, 1, 2], average="macro", zero_division=0)
    assert scores["macro_f1"] == pytest.approx(expected_f1, abs=1e-12)
    loss = nn.functional.cross_entropy(logits, y).item()
    assert scores["loss"] == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("select", ["balanced_accuracy", "macro_f1"])
def test_fit_keeps_the_epoch_best_on_the_selected_metric(select):
    torch.manual_seed(0)
    head = nn.Linear(2, 3)
    x, y = _skewed(1)
    val = _batches(*_skewed(2), batch_size=100)
    result = fit(
        head,
        _batches(x, y, seed=0),
        val,
        [{"params": list(head.parameters()), "lr": 0.05, "weight_decay": 0.0}],
        epochs=12,
        patience=100,
        label_smoothing=0.0,
        device=CPU,
        select=select,
    )
    key = f"val_{select}"
    assert all(key in record for record in result.history)
    best = max(result.history, key=lambda r: (r[key], -r["val_loss"]))
    assert result.best_epoch == best["epoch"]
    assert result.best_val_score == best[key]
    assert result.best_val_accuracy == best["val_accuracy"]
    assert validation_scores(head, val, CPU)[select] == pytest.approx(best[key])
    # The metrics part on this skewed set, so choosing by accuracy could pick another epoch.
    assert any(r[key] != r["val_accuracy"] for r in result.history)


def test_ema_weights_are_validated_and_returned_not_the_raw_ones():
    """With ema, each step moves the average toward the raw weights by (1 - decay): fit
    returns (and leaves in the model) the average, which differs from the last raw weights and
    equals an AveragedModel fed the same steps."""
    torch.manual_seed(0)
    x, y = _skewed(3)
    raw = nn.Linear(2, 3)
    start = {k: v.clone() for k, v in raw.state_dict().items()}
    seen_raw = []

    class Recorder(nn.Module):  # the raw weights after every step, through the training pass
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, inputs):
            if self.training:
                seen_raw.append({k: v.detach().clone() for k, v in self.inner.state_dict().items()})
            return self.inner(inputs)

    model = Recorder(raw)
    decay = 0.9
    final_raw = []
    result = fit(
        model,
        _batches(x, y, batch_size=16, seed=0),
        _batches(x, y, batch_size=80),
        [{"params": list(raw.parameters()), "lr": 0.1, "weight_decay": 0.0}],
        epochs=1,
        patience=5,
        label_smoothing=0.0,
        device=CPU,
        ema=decay,
        on_epoch=lambda record: final_raw.append(raw.weight.detach().clone()),
    )
    # seen_raw[k] is the raw weights before step k + 1; the last step's result is not seen.
    # The average: a copy at the first update, then average = decay * average + (1 - decay) w.
    steps = len(seen_raw)
    assert steps == 5
    assert torch.equal(seen_raw[0]["weight"], start["weight"])
    kept = result.state_dict["inner.weight"]
    assert torch.equal(raw.weight.detach(), kept)  # what is left in the model (and saved)
    assert not torch.allclose(kept, final_raw[0])  # not the raw weights...
    # ...but their average: rebuild it from the recorded raw weights after steps 1..4 and the
    # raw weights after step 5.
    after = [s["weight"] for s in seen_raw[1:]] + final_raw
    average = after[0].clone()
    for weights in after[1:]:
        average = decay * average + (1 - decay) * weights
    assert torch.allclose(kept, average, atol=1e-6)


def test_ema_off_returns_the_raw_weights():
    """Without ema the kept weights are the raw ones after the epoch (captured before fit
    loads the best epoch back, which would make any comparison with the model trivial)."""
    torch.manual_seed(0)
    x, y = _skewed(3)
    head = nn.Linear(2, 3)
    raw_after_epoch = []
    result = fit(
        head,
        _batches(x, y, batch_size=16, seed=0),
        _batches(x, y, batch_size=80),
        [{"params": list(head.parameters()), "lr": 0.1, "weight_decay": 0.0}],
        epochs=1,
        patience=5,
        label_smoothing=0.0,
        device=CPU,
        on_epoch=lambda record: raw_after_epoch.append(head.weight.detach().clone()),
    )
    assert result.best_epoch == 1
    assert torch.equal(result.state_dict["weight"], raw_after_epoch[0])


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_layer_decay_gives_each_block_down_from_the_top_its_learning_rate(name):
    torch.manual_seed(0)
    model = Classifier(build_backbone(name, "none"), 3)
    set_trainable(model, 3)
    groups = param_groups(model, 1e-2, 1e-3, 0.05, layer_decay=0.5)
    blocks = model.backbone.block_parameters()
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for depth, block in enumerate(reversed(blocks)):
        expected = 1e-3 * 0.5**depth
        for parameter in block:
            if depth < 3:
                assert lr_of[id(parameter)] == pytest.approx(expected), depth
            else:
                assert id(parameter) not in lr_of  # frozen
    for parameter in model.backbone.neck.parameters():
        assert lr_of[id(parameter)] == pytest.approx(1e-3)  # with the top block
    assert all(lr_of[id(p)] == 1e-2 for p in model.head.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(lr_of) == trainable
    # 1.0 is the plain two groups of before.
    plain = param_groups(model, 1e-2, 1e-3, 0.05)
    assert {g["name"] for g in plain} <= {"head", "head_no_decay", "backbone", "backbone_no_decay"}


def test_layer_decay_on_a_timm_model_covers_every_trainable_parameter():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = Classifier(build_backbone("timm:vit_tiny_patch16_224", "none"), 3)
    set_trainable(model, 2)
    groups = param_groups(model, 1e-2, 1e-3, 0.05, layer_decay=0.7)
    lrs = sorted({round(g["lr"], 12) for g in groups if g["name"] != "head"} - {1e-2})
    assert lrs == [pytest.approx(1e-3 * 0.7), pytest.approx(1e-3)]
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups))
    assert set(in_groups) == {id(p) for p in model.parameters() if p.requires_grad}


def test_batch_mix_gives_soft_labels_and_fit_trains_on_them():
    assert batch_mix(0.0, 0.0, 3) is None
    torch.manual_seed(0)
    images = torch.randn(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    for mix in (batch_mix(0.4, 0.0, 3), batch_mix(0.0, 1.0, 3), batch_mix(0.4, 1.0, 3)):
        mixed, soft = mix(images, labels)
        assert mixed.shape == images.shape and soft.shape == (6, 3)
        assert torch.allclose(soft.sum(1), torch.ones(6))
        assert not torch.equal(mixed, images)
    # fit accepts the soft targets (cross-entropy on probabilities) and still trains.
    x, y = _skewed(4)
    head = nn.Linear(2, 3)
    result = fit(
        head,
        _batches(x, y, batch_size=16, seed=0),
        _batches(x, y, batch_size=80),
        [{"params": list(head.parameters()), "lr": 0.05, "weight_decay": 0.0}],
        epochs=3,
        patience=5,
        label_smoothing=0.1,
        device=CPU,
        batch_transform=lambda inputs, targets: (
            inputs,
            nn.functional.one_hot(targets, 3).float() * 0.8 + 0.2 / 3,
        ),
    )
    assert all(np.isfinite(r["train_loss"]) for r in result.history)


def test_drop_path_is_random_in_training_and_off_in_eval():
    torch.manual_seed(0)
    backbone = build_backbone("efficientnet_lite0", "none", drop_path=0.5)
    plain = build_backbone("efficientnet_lite0", "none")
    plain.load_state_dict(backbone.state_dict())  # same weights: stochastic depth has none
    images = torch.randn(2, 3, 64, 64)
    backbone.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(backbone(images), plain(images))
        backbone.train()
        first, second = backbone(images), backbone(images)
    assert not torch.equal(first, second)


def test_drop_path_on_a_backbone_without_it_is_a_params_error(params_dict):
    params_dict["finetune"]["drop_path"] = 0.1
    parse_params(params_dict)  # efficientnet_lite0 has it
    params_dict["backbone"]["name"] = "resnet18"
    params_dict["finetune"]["unfreeze"] = 1
    with pytest.raises(ParamsError, match="finetune.drop_path: resnet18"):
        parse_params(params_dict)
    with pytest.raises(ParamsError, match="finetune.drop_path"):
        build_backbone("resnet18", "none", drop_path=0.1)


def _draws(labels, sampler: str, seed: int, epochs: int, world: World | None = None):
    dataset = TensorDataset(torch.zeros(len(labels), 1), torch.as_tensor(labels))
    options = loaders.sampling(
        dataset, 8, True, torch.Generator().manual_seed(seed), world, sampler, labels
    )
    order = options["sampler"]
    return [list(order) for _ in range(epochs)]


def test_balanced_sampler_draws_every_class_equally_often_from_the_seed():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    epochs = _draws(labels, "balanced", seed=0, epochs=30)
    assert all(len(epoch) == len(labels) for epoch in epochs)  # as many steps as shuffle
    drawn = np.bincount(labels[np.concatenate(epochs)], minlength=3) / (30 * len(labels))
    assert np.allclose(drawn, 1 / 3, atol=0.04), drawn
    shuffled = np.bincount(labels[np.concatenate(_draws(labels, "shuffle", 0, 30))]) / 3000
    assert np.allclose(shuffled, [0.9, 0.09, 0.01])
    assert _draws(labels, "balanced", 0, 2) == _draws(labels, "balanced", 0, 2)
    assert _draws(labels, "balanced", 0, 1) != _draws(labels, "balanced", 1, 1)


def test_balanced_sampler_is_dealt_out_among_processes_as_one_process_draws():
    labels = np.array([0] * 30 + [1] * 6 + [2] * 4)
    one = _draws(labels, "balanced", seed=5, epochs=2)
    for size in (2, 4):
        shares = [
            _draws(labels, "balanced", 5, 2, World(rank, size, rank, size)) for rank in range(size)
        ]
        for epoch in range(2):
            # Global batch k of 8 is dealt one item per rank in turn: rank r's k-th batch is
            # its items r, r + size, ...
            merged = [None] * len(labels)
            for start in range(0, len(labels), 8):
                for rank in range(size):
                    begin = start // size
                    merged[start + rank : start + 8 : size] = shares[rank][epoch][
                        begin : begin + 8 // size
                    ]
            assert merged == one[epoch], size


def test_an_image_drawn_twice_in_an_epoch_gets_two_augmentations():
    order = loaders.SeededOrder([3, 1, 3, 3], seed=0)
    seeds = [seed for _, seed in order]
    assert len(set(seeds)) == 4
    assert seeds[1] - seeds[0] == 1 - 3  # first draws keep the shuffle's seeds: epoch + index


@pytest.mark.parametrize("augment", ["photo", "strong"])
def test_photo_policies_flip_crop_and_normalise(augment):
    from PIL import Image

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    transform = train_transform(augment, size=24, mean=mean, std=std)
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[:, :30] = (250, 10, 10)  # left half red, right half dark: a flip shows
    image = Image.fromarray(pixels)
    outputs = []
    for seed in range(12):
        torch.manual_seed(seed)
        outputs.append(transform(image))
    assert all(o.shape == (3, 24, 24) and o.dtype == torch.float32 for o in outputs)
    torch.manual_seed(3)
    assert torch.equal(transform(image), outputs[3])  # a function of the seed
    # Some draws put the red half on the right: the mirror image.
    red = (1.0 - mean[0]) / std[0]
    right_red = [bool((o[0, :, -4:] > red * 0.5).float().mean() > 0.5) for o in outputs]
    assert any(right_red)
