"""Strict, typed loading of params.yaml.

One frozen dataclass per section. Every stage loads and validates the whole file (so a typo in
any section is caught by the first stage that runs), then reads only its own sections; dvc.yaml
lists exactly those keys so DVC reruns a stage only when its settings change.

YAML is read the way DVC reads it, with ruamel's safe YAML 1.2 loader (`lr: 1e-3` is 0.001, not
the string PyYAML's YAML 1.1 rules give): no tags that construct Python objects.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from headstart.backbones import BACKBONES


class ParamsError(ValueError):
    """A params.yaml problem; the message names the key and the fix."""


# YAML 1.2 floats, for values that arrive as strings (e.g. from a hand-built mapping).
_FLOAT_1_2 = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")


@dataclass(frozen=True)
class DataParams:
    """Where the ImageFolder is and how it is split (read by prepare)."""

    dir: str
    val_fraction: float
    test_fraction: float
    seed: int

    def validate(self) -> None:
        _check(
            0.0 < self.val_fraction < 1.0,
            "data.val_fraction",
            "must be in (0, 1): the validation split picks the best epoch",
        )
        _check(0.0 < self.test_fraction < 1.0, "data.test_fraction", "must be in (0, 1)")
        _check(
            self.val_fraction + self.test_fraction < 0.9,
            "data.val_fraction",
            f"data.val_fraction + data.test_fraction = "
            f"{self.val_fraction + self.test_fraction:g} leaves too little for training; "
            "keep the sum below 0.9",
        )
        _check(bool(self.dir.strip()), "data.dir", "must name an ImageFolder directory")


@dataclass(frozen=True)
class BackboneParams:
    """The pretrained network (read by extract, finetune)."""

    name: str
    weights: str
    image_size: int | str

    def validate(self) -> None:
        _check(
            self.name in BACKBONES,
            "backbone.name",
            f"unknown backbone {self.name!r}; known: {', '.join(sorted(BACKBONES))}",
        )
        if isinstance(self.image_size, str):
            _check(self.image_size == "auto", "backbone.image_size", "must be 'auto' or pixels")
        else:
            _check(32 <= self.image_size <= 1024, "backbone.image_size", "must be in [32, 1024]")


@dataclass(frozen=True)
class ComputeParams:
    """Where and how batches run (read by extract, finetune, evaluate)."""

    device: str
    num_workers: int
    batch_size: int
    precision: str
    threads: int | str
    nproc: int

    def validate(self) -> None:
        _check(
            self.device in ("auto", "cpu", "mps") or self.device.startswith("cuda"),
            "compute.device",
            "must be 'auto', 'cpu', 'cuda[:N]' or 'mps'",
        )
        _check(self.num_workers >= 0, "compute.num_workers", "must be >= 0")
        _check(self.batch_size >= 1, "compute.batch_size", "must be >= 1")
        _check(
            self.precision in ("auto", "float32", "bfloat16", "float16"),
            "compute.precision",
            "must be auto, float32, bfloat16 or float16",
        )
        if isinstance(self.threads, str):
            _check(self.threads == "auto", "compute.threads", "must be 'auto' or a thread count")
        else:
            _check(self.threads >= 1, "compute.threads", "must be 'auto' or >= 1")
        _check(self.nproc >= 1, "compute.nproc", "must be >= 1 (1: one process, no torchrun)")


@dataclass(frozen=True)
class HeadParams:
    """The classifier trained on cached features (read by train_head)."""

    kind: str
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    patience: int
    label_smoothing: float
    seed: int

    def validate(self) -> None:
        _check(self.kind in ("linear", "logreg"), "head.kind", "must be 'linear' or 'logreg'")
        _check(self.lr > 0, "head.lr", "must be > 0")
        _check(self.weight_decay >= 0, "head.weight_decay", "must be >= 0")
        _check(self.epochs >= 1, "head.epochs", "must be >= 1")
        _check(self.batch_size >= 1, "head.batch_size", "must be >= 1")
        _check(self.patience >= 1, "head.patience", "must be >= 1")
        _check(0 <= self.label_smoothing < 1, "head.label_smoothing", "must be in [0, 1)")


@dataclass(frozen=True)
class FinetuneParams:
    """Fine-tuning the top blocks from the trained head (read by finetune)."""

    unfreeze: int
    lr_head: float
    lr_backbone: float
    weight_decay: float
    epochs: int
    batch_size: int
    patience: int
    label_smoothing: float
    augment: str
    bn: str
    seed: int

    def validate(self) -> None:
        _check(self.unfreeze >= 0, "finetune.unfreeze", "must be >= 0 (0 trains the head only)")
        _check(self.lr_head > 0, "finetune.lr_head", "must be > 0")
        _check(self.lr_backbone > 0, "finetune.lr_backbone", "must be > 0")
        _check(self.weight_decay >= 0, "finetune.weight_decay", "must be >= 0")
        _check(self.epochs >= 1, "finetune.epochs", "must be >= 1")
        _check(self.batch_size >= 1, "finetune.batch_size", "must be >= 1")
        _check(self.patience >= 1, "finetune.patience", "must be >= 1")
        _check(0 <= self.label_smoothing < 1, "finetune.label_smoothing", "must be in [0, 1)")
        _check(self.augment in ("none", "light"), "finetune.augment", "must be 'none' or 'light'")
        _check(self.bn in ("frozen", "train"), "finetune.bn", "must be 'frozen' or 'train'")


@dataclass(frozen=True)
class EvaluateParams:
    """Test metrics and calibration (read by evaluate)."""

    calibrate: bool  # fit a temperature on the validation split for predict and export

    def validate(self) -> None:
        pass  # a bool is all it can be; _coerce has checked the type


@dataclass(frozen=True)
class Params:
    data: DataParams
    backbone: BackboneParams
    compute: ComputeParams
    head: HeadParams
    finetune: FinetuneParams
    evaluate: EvaluateParams


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ParamsError(f"params.yaml: {key}: {problem}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Return `value` as the annotated type, or raise naming the key. Ints widen to floats."""
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    options = allowed or (annotation,)
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str) and _FLOAT_1_2.match(value.strip()):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ParamsError(
        f"params.yaml: {key}: expected {names}, got {type(value).__name__} {value!r}"
        + (" (write floats as 1.0e-3)" if float in options else "")
    )


def _check_keys(raw: dict, expected: list[str], kind: str, prefix: str) -> None:
    """Refuse unknown and missing keys, naming the first of each."""
    unknown = sorted(set(raw) - set(expected))
    if unknown:
        raise ParamsError(
            f"params.yaml: unknown {kind} {prefix}{unknown[0]}; expected: {', '.join(expected)}"
        )
    missing = [k for k in expected if k not in raw]
    if missing:
        raise ParamsError(f"params.yaml: missing {kind} {prefix}{missing[0]}")


def _section(cls: type, raw: Any, name: str) -> Any:
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: section {name!r} must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    expected = [f.name for f in fields(cls)]
    _check_keys(raw, expected, "key", f"{name}.")
    section = cls(**{k: _coerce(raw[k], hints[k], f"{name}.{k}") for k in expected})
    section.validate()
    return section


def parse_params(raw: Any) -> Params:
    """Validate an already-loaded params mapping."""
    if not isinstance(raw, dict):
        raise ParamsError("params.yaml: expected a mapping of sections at the top level")
    hints = typing.get_type_hints(Params)
    expected = [f.name for f in fields(Params)]
    _check_keys(raw, expected, "section", "")
    params = Params(**{k: _section(hints[k], raw[k], k) for k in expected})
    blocks = BACKBONES[params.backbone.name].num_blocks
    _check(
        params.finetune.unfreeze <= blocks,
        "finetune.unfreeze",
        f"{params.finetune.unfreeze} is more blocks than {params.backbone.name} has ({blocks}); "
        f"use 0..{blocks}",
    )
    _check(
        params.finetune.batch_size % params.compute.nproc == 0,
        "finetune.batch_size",
        f"{params.finetune.batch_size} does not split evenly over compute.nproc "
        f"{params.compute.nproc} processes; make it a multiple of {params.compute.nproc}",
    )
    return params


def _read_yaml(text: str) -> Any:
    """Parse as DVC does: ruamel's safe loader, YAML 1.2 (`1e-3` is 0.001, `012` is 12, `on`
    is a string). Safe: tags that would construct Python objects are refused."""
    return YAML(typ="safe", pure=True).load(text)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read, type-check and validate params.yaml; raise ParamsError naming the key on problems."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the project root, where params.yaml is")
    try:
        raw = _read_yaml(path.read_text(encoding="utf-8"))
    except YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from error
    return parse_params(raw)


def as_dict(section: Any) -> dict[str, Any]:
    """A params section as a plain dict, for checkpoint metadata."""
    return dataclasses.asdict(section)
