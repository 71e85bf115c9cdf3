"""Shared fixtures: a tiny synthetic ImageFolder and valid params, both made from scratch.

Everything is generated with a fixed seed, so file bytes (and therefore content-hash splits)
are the same on every run.
"""

from __future__ import annotations

import copy
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

CLASSES = ("bird", "cat", "dog")
IMAGES_PER_CLASS = 12
# (width, height): portrait, square and landscape, all small.
SIZES = ((16, 20), (24, 24), (20, 16))
COLOURS = {"bird": (40, 60, 220), "cat": (220, 50, 40), "dog": (40, 200, 60)}


def pytest_configure(config: pytest.Config) -> None:
    # Tiny tensors run fastest on one thread; with more, OpenMP threads spin against each other
    # (and against anything else on the machine), which made a 32 px forward pass take seconds.
    torch.set_num_threads(1)
    # The same for the processes the tests start (stages under `dvc repro`, the CLI): torch's
    # default thread count comes from OMP_NUM_THREADS. On a busy 2-core machine a tiny export
    # took 16.6 s with torch's default of 2 threads and 3.5 s with 1.
    os.environ["OMP_NUM_THREADS"] = "1"


# The slowest modules, slowest first. xdist (`--dist loadfile --no-loadscope-reorder`, in
# pyproject.toml) hands each worker whole files in collection order: long files first, so no
# worker is left running one at the end while the other idles. The first builds the shared
# dvc_baseline; test_e2e_timm starts with repositories of its own, so the second worker does not
# wait for it.
SLOWEST_FIRST = (
    "test_e2e_experiments.py",
    "test_e2e_timm.py",
    "test_e2e_dvc.py",
    "test_e2e_interrupt.py",
    "test_distributed.py",
    "test_e2e_zoo.py",
    "test_gpu_check.py",
    "test_export_parity.py",
    "test_familiarity.py",
    "test_serve.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


@pytest.fixture(scope="session", autouse=True)
def _session_store(tmp_path_factory) -> Iterator[Path]:
    """The store (headstart.store) of the session's shared fixtures (dvc_baseline), never the
    real one in the home folder; the dvc subprocesses inherit the variable."""
    from headstart.store import LOCATION_VARIABLE

    root = tmp_path_factory.mktemp("session-store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(LOCATION_VARIABLE, str(root))
        patch.delenv("HEADSTART_CACHE", raising=False)
        patch.delenv("HEADSTART_CACHE_SIZE", raising=False)
        yield root


@pytest.fixture(autouse=True)
def store_root(tmp_path_factory, monkeypatch) -> Path:
    """Each test's own empty store: what one test stores never reaches another."""
    from headstart.store import LOCATION_VARIABLE

    root = tmp_path_factory.mktemp("store")
    monkeypatch.setenv(LOCATION_VARIABLE, str(root))
    return root


def draw_image(label: str, seed: int, size: tuple[int, int] = (24, 24)) -> np.ndarray:
    """(H, W, 3) uint8: a class-specific pattern in a class-specific colour, plus noise.

    cat: horizontal stripes, dog: vertical stripes, bird: a checkerboard. The pattern survives
    conversion to greyscale; the colour tells the classes apart in RGB. The noise makes every
    image's bytes unique (identical bytes would share a split and shrink the data).
    """
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    if label == "cat":
        ink = (y // 2) % 2
    elif label == "dog":
        ink = (x // 2) % 2
    else:
        ink = ((x // 4) + (y // 4)) % 2
    colour = np.array(COLOURS.get(label, (128, 128, 128)), dtype=np.float64)
    pixels = ink[..., None] * colour + (1 - ink[..., None]) * 25.0  # (H, W, 3)
    pixels += rng.normal(0.0, 10.0, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def save_image(path: Path, label: str, seed: int, size=(24, 24), mode="RGB") -> Path:
    """Write one synthetic image; the format follows the suffix (.png or .jpg)."""
    image = Image.fromarray(draw_image(label, seed, size), "RGB")
    if mode == "L":
        image = image.convert("L")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, "JPEG", quality=90)
    else:
        image.save(path, "PNG")
    return path


def write_image_folder(root: Path) -> Path:
    """3 classes x 12 images: PNG and JPEG, RGB and greyscale, three sizes."""
    for class_index, label in enumerate(CLASSES):
        for index in range(IMAGES_PER_CLASS):
            suffix = ".png" if index % 2 == 0 else ".jpg"
            mode = "L" if index % 3 == 0 else "RGB"
            save_image(
                root / label / f"{label}_{index:02d}{suffix}",
                label,
                seed=1000 * class_index + index,
                size=SIZES[index % len(SIZES)],
                mode=mode,
            )
    return root


def valid_params() -> dict:
    """A params mapping with the structure of the shipped params.yaml, sized for tests."""
    return {
        "data": {
            "dir": "images",
            "val_fraction": 0.15,
            "test_fraction": 0.15,
            "seed": 42,
            "near_copies": "phash",
        },
        "backbone": {"name": "efficientnet_lite0", "weights": "none", "image_size": 32},
        "compute": {
            "device": "cpu",
            "num_workers": 0,
            "precision": "auto",
            "threads": "auto",
            "nproc": 1,
        },
        "inference": {"batch_size": 16},
        "head": {
            "kind": "linear",
            "lr": 1.0e-2,
            "weight_decay": 1.0e-4,
            "epochs": 3,
            "batch_size": 16,
            "patience": 15,
            "label_smoothing": 0.0,
            "class_weight": "none",
            "select": "accuracy",
            "seed": 0,
        },
        "finetune": {
            "unfreeze": 1,
            "lr_head": 1.0e-3,
            "lr_backbone": 1.0e-4,
            "weight_decay": 1.0e-4,
            "epochs": 1,
            "batch_size": 8,
            "patience": 5,
            "label_smoothing": 0.1,
            "class_weight": "none",
            "sampler": "shuffle",
            "select": "accuracy",
            "augment": "light",
            "mixup": 0.0,
            "cutmix": 0.0,
            "layer_decay": 1.0,
            "ema": 0.0,
            "drop_path": 0.0,
            "bn": "frozen",
            "seed": 0,
        },
        "evaluate": {
            "calibrate": True,
            "tta": "none",
            "guard_neighbours": 3,
            "guard_flag_rate": 0.05,
            "guard_reference": 10000,
            "guard_foreign": ["noise", "blank"],
        },
        "compare": {"backbones": ["efficientnet_lite0"], "weights": "none", "image_size": 32},
        "audit": {
            "folds": 3,
            "logreg_c": 0.1,
            "duplicate_threshold": 0.97,
            "neighbours": 3,
            "outlier_fence": 3.0,
            "max_shown": 8,
            "seed": 0,
        },
    }


def classifier_meta(model, classes: list[str], image_size: int = 32) -> dict:
    """A classifier checkpoint's metadata as finetune writes it, for an efficientnet_lite0
    Classifier (normalisation deliberately not the backbone's own)."""
    return {
        "kind": "classifier",
        "backbone": "efficientnet_lite0",
        "num_features": model.backbone.num_features,
        "image_size": image_size,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "classes": classes,
        "params": {"backbone": {"name": "efficientnet_lite0"}, "finetune": {"unfreeze": 1}},
        "summary": {"best_epoch": 1, "val_accuracy": 0.5},
    }


def write_features(directory: Path, splits: dict, classes: list[str]) -> Path:
    """A features folder as extract writes it: {split}_features.npy and {split}_labels.npy for
    each split in `splits` ({split: (features (N, D), labels (N,))}), and meta.json with each
    file's sha256."""
    from headstart.io import sha256_file, write_array, write_json

    directory.mkdir(parents=True, exist_ok=True)
    for split, (features, labels) in splits.items():
        write_array(directory / f"{split}_features.npy", np.asarray(features, dtype=np.float32))
        write_array(directory / f"{split}_labels.npy", np.asarray(labels, dtype=np.int64))
    width = next(iter(splits.values()))[0].shape[1]
    meta = {"num_features": width, "classes": classes, "image_size": 32}
    meta |= {"mean": [0.5] * 3, "std": [0.25] * 3}
    meta["files"] = {p.name: sha256_file(p) for p in sorted(directory.glob("*.npy"))}
    write_json(directory / "meta.json", meta)
    return directory


def dump_params(directory: Path, mapping: dict) -> Path:
    """Write `mapping` as directory/params.yaml and return its path."""
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(mapping, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def image_folder_factory() -> Callable[[Path], Path]:
    """For fixtures with a wider scope than tmp_path: write the ImageFolder under a root."""
    return write_image_folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A fresh synthetic ImageFolder: <tmp>/images/{bird,cat,dog}/<12 images each>."""
    return write_image_folder(tmp_path / "images")


@pytest.fixture
def make_image() -> Callable[..., Path]:
    """save_image(path, label, seed, size=(w, h), mode="RGB"|"L"): one more synthetic image."""
    return save_image


@pytest.fixture
def params_dict() -> dict:
    """A fresh, valid params mapping (safe to mutate)."""
    return copy.deepcopy(valid_params())


@pytest.fixture(scope="session")
def params_factory() -> Callable[[], dict]:
    """For fixtures with a wider scope: returns a fresh, valid params mapping per call."""
    return valid_params


@pytest.fixture(scope="session")
def write_params() -> Callable[[Path, dict], Path]:
    """write_params(directory, mapping) -> directory/params.yaml."""
    return dump_params


@pytest.fixture(scope="session")
def dvc_baseline(tmp_path_factory) -> Iterator[Path]:
    """A git + DVC repository of this project on the synthetic ImageFolder with the end-to-end
    tests' small params (test_e2e_dvc.FAST), whose whole pipeline has run once with `dvc repro`
    and is committed. Built once per test run and shared by the end-to-end modules and the
    xdist workers (the first to need it builds it, under a lock; the others wait for it): copy
    it (test_e2e_dvc._copy_repo, cache included) before changing anything."""
    from test_e2e_dvc import FAST, make_repo, pipeline_stages, ran_stages, run

    # Under xdist every worker has its own basetemp; their parent is the run's, shared.
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    root = shared / "baseline"
    with open(shared / "baseline.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (shared / "baseline.built").exists():
            shutil.rmtree(root, ignore_errors=True)  # a failed build of another worker
            root.mkdir()
            repo = make_repo(root, write_image_folder(root / "images"), FAST)
            output = run(repo, "dvc", "repro")
            assert ran_stages(output) == pipeline_stages(repo)
            run(repo, "git", "add", "-A")
            run(repo, "git", "commit", "-q", "-m", "baseline run")
            (shared / "baseline.built").touch()
    repo = root / "repo"
    yield repo
    # A test that changed the shared repository would have changed what the others saw.
    assert run(repo, "git", "status", "--porcelain") == "", "a test changed the shared baseline"


@pytest.fixture
def stage_run(caplog):
    """stage.run(main, argv) -> (exit code, ERROR messages); restores the SIGTERM handler."""
    import logging
    import signal

    from headstart import stage

    previous = signal.getsignal(signal.SIGTERM)
    caplog.set_level(logging.INFO)

    def call(main, argv):
        caplog.clear()
        code = stage.run(main, argv)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        return code, errors

    yield call
    signal.signal(signal.SIGTERM, previous)
