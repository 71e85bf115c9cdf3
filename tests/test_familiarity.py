"""The unfamiliar-image guard: its scores, threshold, file and what it catches on real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headstart.errors import ArtifactError, DataError
from headstart.familiarity import (
    FOREIGN,
    LogitsAndFeatures,
    build_guard,
    foreign_images,
    guard_bytes,
    read_guard,
    reference_sample,
    split_outputs,
)
from headstart.inference import with_tta
from headstart.neighbours import nearest_distances, normalised


def _clusters(count: int, seed: int, width: int = 16) -> np.ndarray:
    """Features around three centres, as a trained backbone gives for three classes."""
    rng = np.random.default_rng(seed)
    centres = np.eye(3, width) * 4.0
    return (centres[rng.integers(0, 3, count)] + rng.normal(0, 0.5, (count, width))).astype(
        np.float32
    )


def test_scores_are_scikit_learns_mean_nearest_distances():
    from sklearn.neighbors import NearestNeighbors

    train, queries = _clusters(300, 0), _clusters(40, 1)
    guard = build_guard(train, _clusters(100, 2), neighbours=5, flag_rate=0.05)
    reference = normalised(guard.reference.astype(np.float32))  # float16 storage, renormalised
    distances, _ = NearestNeighbors(n_neighbors=5).fit(reference).kneighbors(normalised(queries))
    np.testing.assert_allclose(guard.scores(queries), distances.mean(1), rtol=1e-5, atol=1e-6)
    # Tiles smaller than the data give the same neighbours.
    tiled = nearest_distances(normalised(queries), reference, 5, tile=7)
    np.testing.assert_allclose(tiled.mean(1), guard.scores(queries), rtol=1e-6)


def test_the_threshold_flags_the_asked_share_of_val_and_catches_far_features():
    val = _clusters(400, 3)
    guard = build_guard(_clusters(500, 4), val, neighbours=10, flag_rate=0.02)
    flagged = (~guard.familiar(guard.scores(val))).mean()
    assert 0.0 < flagged <= 0.02
    # Held-out features of the same clusters: about the same share; far ones: all.
    held_out = (~guard.familiar(guard.scores(_clusters(2000, 5)))).mean()
    assert held_out < 0.05
    far = np.random.default_rng(6).normal(0, 1, (50, 16)).astype(np.float32)
    far[:, 3:] += 4.0  # along directions no class uses
    assert (~guard.familiar(guard.scores(far))).all()


def test_the_reference_is_a_seeded_sample_in_index_order():
    np.testing.assert_array_equal(reference_sample(5, 10), np.arange(5))
    sample = reference_sample(1000, 100)
    assert len(sample) == 100 and len(set(sample.tolist())) == 100
    assert (np.diff(sample) > 0).all()
    np.testing.assert_array_equal(sample, reference_sample(1000, 100))


def test_no_val_images_is_a_clear_error():
    with pytest.raises(DataError, match="needs train and val images"):
        build_guard(_clusters(10, 0), np.zeros((0, 16), np.float32), 3, 0.01)


def test_guard_file_round_trips_is_deterministic_and_tied_to_the_model(tmp_path):
    model = tmp_path / "finetuned.pt"
    model.write_bytes(b"model version 1")
    guard = build_guard(_clusters(50, 0), _clusters(20, 1), 5, 0.05)
    data = guard_bytes(guard, model)
    assert data == guard_bytes(build_guard(_clusters(50, 0), _clusters(20, 1), 5, 0.05), model)
    path = tmp_path / "finetuned.guard.safetensors"
    path.write_bytes(data)
    loaded = read_guard(path, model)
    np.testing.assert_array_equal(loaded.reference, guard.reference)
    assert (loaded.neighbours, loaded.threshold) == (guard.neighbours, guard.threshold)

    model.write_bytes(b"model version 2")
    with pytest.raises(ArtifactError, match="another version of"):
        read_guard(path, model)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="not a readable guard file"):
        read_guard(path, model)


@pytest.mark.parametrize(
    "name, size",
    [
        ("efficientnet_lite0", 32),
        ("resnet18", 32),
        ("mobilenet_v3_small", 32),
        ("convnext_tiny", 32),
        ("timm:test_vit.r160_in1k", 160),
    ],
)
def test_logits_and_features_are_the_models_for_every_family(name, size):
    """Every backbone family gives the guard its pooled features (random init, no weights)."""
    from headstart.backbones import build_backbone
    from headstart.model import Classifier

    torch.manual_seed(0)
    tiny_classifier = Classifier(build_backbone(name, "none"), 3).eval()
    images = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for tta in ("none", "flip"):
            logits, features = split_outputs(
                LogitsAndFeatures(tiny_classifier, tta).eval()(images).numpy(), 3
            )
            expected = with_tta(tiny_classifier, tta).eval()(images).numpy()
            np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(
                features, tiny_classifier.backbone(images).numpy(), rtol=1e-6, atol=1e-6
            )
            assert features.shape == (4, tiny_classifier.backbone.num_features)


def test_foreign_sets_are_fixed_rgb_images():
    for name in FOREIGN:
        images = foreign_images(name, 40)
        assert len(images) == 48 and all(image.mode == "RGB" for image in images)
        again = foreign_images(name, 40)
        assert all(
            np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again, strict=True)
        )


def test_noise_and_blank_frames_are_flagged_on_the_digits(tmp_path):
    """The shipped pretrained backbone on the built-in digits: noise and solid frames are
    caught, and about the asked share of held-out digits is flagged."""
    from headstart.backbones import backbone_spec, build_backbone
    from headstart.builtin import write_digits
    from headstart.images import load_rgb
    from headstart.model import Classifier
    from headstart.transforms import eval_transform

    write_digits(tmp_path)
    paths = sorted(tmp_path.rglob("*.png"))
    order = np.random.default_rng(0).permutation(len(paths))
    spec = backbone_spec("efficientnet_lite0")
    model = Classifier(build_backbone("efficientnet_lite0", "pretrained"), 10).eval()
    transform = eval_transform(64, spec.mean, spec.std)

    def features_of(images) -> np.ndarray:
        batch = torch.stack([transform(image) for image in images])
        with torch.inference_mode():
            return split_outputs(LogitsAndFeatures(model)(batch).numpy(), 10)[1]

    train, val, test = (
        features_of([load_rgb(paths[i]) for i in order[a:b]])
        for a, b in ((0, 600), (600, 800), (800, 1000))
    )
    guard = build_guard(train, val, neighbours=10, flag_rate=0.02)
    assert (~guard.familiar(guard.scores(test))).mean() < 0.08
    for name in ("noise", "blank"):
        caught = ~guard.familiar(guard.scores(features_of(foreign_images(name, 64))))
        assert caught.all(), f"{name}: {caught.mean():.2f} caught"
