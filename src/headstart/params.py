"""Strict, typed loading of params.yaml, and the one place each key is documented.

One frozen dataclass per section; each field's `doc` is the key's documentation, which
`headstart params` prints (headstart.params_doc) and docs/params.md holds (a test keeps the
two equal). Every stage loads and validates the whole file (so a typo in any section is caught
by the first stage that runs), then reads only its own sections; dvc.yaml lists exactly those
keys so DVC reruns a stage only when its settings change.

YAML is read the way DVC reads it, with ruamel's safe YAML 1.2 loader (`lr: 1e-3` is 0.001, not
the string PyYAML's YAML 1.1 rules give): no tags that construct Python objects.
"""

from __future__ import annotations

import dataclasses
import re
import typing
import unicodedata
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ruamel.yaml.error import YAMLError

from headstart.backbone_specs import BACKBONES, TIMM_PREFIX, backbone_spec, drop_path_unsupported
from headstart.choices import AUGMENTATIONS, HEADS, SAMPLERS, SELECT
from headstart.errors import ParamsError
from headstart.params_stages import AuditParams, EvaluateParams
from headstart.params_types import RENAMED, check, check_keys, coerce, doc, read_yaml

__all__ = ["ParamsError", "Params", "load_params", "parse_params", "as_dict"]

# Learning rates above this are typos (AdamW steps by about lr per step), and overflow float32.
MAX_LR = 10.0

# data.near_copies: how prepare groups images that must share a split (headstart.near_copies).
NEAR_COPIES = ("phash", "off")
# head.class_weight and finetune.class_weight.
CLASS_WEIGHTS = ("none", "balanced")
CLASS_WEIGHT_DOC = (
    "`none` | `balanced`: each class's loss weighted by N / (classes x its train images), so "
    "a rare class counts as much as a common one (logreg: scikit-learn's `balanced`)."
)
SELECT_DOC = (
    f"The val metric that picks the best epoch and drives early stopping: {' | '.join(SELECT)} "
    "(ties broken by val loss). On skewed classes, `balanced_accuracy` or `macro_f1`."
)


@dataclass(frozen=True)
class DataParams:
    """Where the ImageFolder is and how it is split (read by prepare)."""

    dir: str = doc(
        "The ImageFolder, `<dir>/<class>/<image>` (or pre-split `<dir>/<train|val|test>/"
        "<class>/<image>`); `data/digits` is the built-in dataset."
    )
    val_fraction: float = doc(
        "Share of each class held out for validation (early stopping, model choice), in (0, 1)."
    )
    test_fraction: float = doc("Share of each class held out for the test metrics, in (0, 1).")
    seed: int = doc("Split seed: an image's split is fixed by its content and this seed.")
    near_copies: str = doc(
        "`phash` (images with equal perceptual hashes share a split, as identical files do: "
        "resized or re-encoded copies cannot leak from train into test) | `off` (only identical "
        "files); docs/audit.md#near-copies-in-prepare."
    )

    def validate(self) -> None:
        check(
            0.0 < self.val_fraction < 1.0,
            "data.val_fraction",
            "must be in (0, 1): the validation split picks the best epoch",
        )
        check(0.0 < self.test_fraction < 1.0, "data.test_fraction", "must be in (0, 1)")
        check(self.near_copies in NEAR_COPIES, "data.near_copies", "must be 'phash' or 'off'")
        check(
            self.val_fraction + self.test_fraction < 0.9,
            "data.val_fraction",
            f"data.val_fraction + data.test_fraction = "
            f"{self.val_fraction + self.test_fraction:g} leaves too little for training; "
            "keep the sum below 0.9",
        )
        check(bool(self.dir.strip()), "data.dir", "must name an ImageFolder directory")
        # dvc.yaml passes data.dir to the stages single-quoted: a quote would end the quoting.
        unsafe = [c for c in self.dir if c == "'" or unicodedata.category(c) == "Cc"]
        check(
            not unsafe,
            "data.dir",
            f"{self.dir!r} holds {ascii(unsafe[0]) if unsafe else ''}, which the stage commands "
            "cannot pass on; rename the folder without quotes or control characters",
        )
        check(
            not self.dir.startswith("-"),
            "data.dir",
            "must not start with '-' (it would read as an option); prefix it with ./",
        )


@dataclass(frozen=True)
class BackboneParams:
    """The pretrained network (read by extract, finetune)."""

    name: str = doc(
        f"The pretrained backbone: {', '.join(BACKBONES)}, or any timm model as "
        "`timm:<name>[.<tag>]` (docs/backbones.md)."
    )
    weights: str = doc(
        "`pretrained` (ImageNet weights: shipped for efficientnet_lite0/1/2, downloaded by "
        "torchvision or timm otherwise) | `none` (random init, for smoke tests) | a torchvision "
        "weights enum such as `ResNet50_Weights.IMAGENET1K_V2` | a local state-dict file "
        "(`.pth`, `.safetensors`) under `pretrained/` (a DVC dependency)."
    )
    image_size: int | str = doc(
        "Input pixels (square), 32 to 1024, or `auto`: the backbone's own size if it takes only "
        "one (most ViTs), else from the data's median short side (4x it, rounded up to a "
        "multiple of 32, at least 96 and at most the backbone's training size)."
    )

    def validate(self) -> None:
        _check_backbone_name(self.name, "backbone.name")
        _check_weights(self.weights, "backbone.weights")
        _check_image_size(self.image_size, "backbone.image_size")


def _check_backbone_name(name: str, key: str) -> None:
    check(
        name in BACKBONES or (name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX)),
        key,
        f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}, or timm:<model>",
    )


def _check_weights(weights: str, key: str) -> None:
    if weights not in ("pretrained", "none") and "_Weights." not in weights:
        # A file: extract and finetune depend on pretrained/ in dvc.yaml, so a file
        # elsewhere could change without DVC rerunning them.
        parts = Path(weights).parts
        check(
            len(parts) >= 2 and parts[0] == "pretrained" and ".." not in parts,
            key,
            f"{weights!r}: a weights file must be under pretrained/ (a DVC dependency of "
            f"extract and finetune); copy it there and set {key} to pretrained/<file>",
        )


def _check_image_size(image_size: int | str, key: str) -> None:
    if isinstance(image_size, str):
        check(image_size == "auto", key, "must be 'auto' or pixels")
    else:
        check(32 <= image_size <= 1024, key, "must be in [32, 1024]")


@dataclass(frozen=True)
class ComputeParams:
    """Where and how the work runs (read by extract and finetune whole, by evaluate in part)."""

    device: str = doc(
        "`auto` (CUDA if present, else Apple MPS, else CPU) | `cpu` | `cuda` | `cuda:N` | `mps`."
    )
    num_workers: int = doc("Image decoding processes (0: decode in the main process).")
    precision: str = doc(
        "`auto`: bfloat16 autocast on GPUs; on CPUs with native bfloat16, for extraction only "
        "(fine-tuning stays float32) | `float32` | `bfloat16` | `float16`. Evaluate and predict "
        "always run float32."
    )
    threads: int | str = doc(
        "CPU threads for torch: `auto` (one per physical core; with nproc, shared among the "
        "processes) | a number (each process's)."
    )
    nproc: int = doc(
        "Processes for extract and finetune: 1, or N (torchrun on this machine: N GPUs with "
        "NCCL, or N CPU processes with gloo)."
    )

    def validate(self) -> None:
        check(
            self.device in ("auto", "cpu", "mps") or re.fullmatch(r"cuda(:\d+)?", self.device),
            "compute.device",
            "must be 'auto', 'cpu', 'cuda[:N]' or 'mps'",
        )
        check(self.num_workers >= 0, "compute.num_workers", "must be >= 0")
        check(
            self.precision in ("auto", "float32", "bfloat16", "float16"),
            "compute.precision",
            "must be auto, float32, bfloat16 or float16",
        )
        if isinstance(self.threads, str):
            check(self.threads == "auto", "compute.threads", "must be 'auto' or a thread count")
        else:
            check(self.threads >= 1, "compute.threads", "must be 'auto' or >= 1")
        check(self.nproc >= 1, "compute.nproc", "must be >= 1 (1: one process, no torchrun)")


@dataclass(frozen=True)
class InferenceParams:
    """Batches that only run forward (read by extract, evaluate)."""

    batch_size: int = doc(
        "Images per batch for extraction and evaluation; lower it if a batch runs out of memory."
    )

    def validate(self) -> None:
        check(self.batch_size >= 1, "inference.batch_size", "must be >= 1")


@dataclass(frozen=True)
class HeadParams:
    """The classifier trained on cached features (read by train_head)."""

    kind: str = doc(
        "`linear` (torch, AdamW, the keys below) | `logreg` (scikit-learn logistic "
        "regression, C picked on val; uses only `seed`)."
    )
    lr: float = doc("Learning rate (peak of the cosine schedule).")
    weight_decay: float = doc("AdamW weight decay.")
    epochs: int = doc("Most epochs to train.")
    batch_size: int = doc("Features per training batch.")
    patience: int = doc("Stop after this many epochs without a better val `select` metric.")
    label_smoothing: float = doc("Cross-entropy label smoothing, in [0, 1).")
    class_weight: str = doc(CLASS_WEIGHT_DOC)
    select: str = doc(SELECT_DOC + " logreg picks its C by it.")
    seed: int = doc("Seed for initialisation and shuffling.")

    def validate(self) -> None:
        check(self.kind in HEADS, "head.kind", f"must be one of {', '.join(HEADS)}")
        check(0 < self.lr <= MAX_LR, "head.lr", f"must be in (0, {MAX_LR:g}]")
        check(self.weight_decay >= 0, "head.weight_decay", "must be >= 0")
        check(self.epochs >= 1, "head.epochs", "must be >= 1")
        check(self.batch_size >= 1, "head.batch_size", "must be >= 1")
        check(self.patience >= 1, "head.patience", "must be >= 1")
        check(0 <= self.label_smoothing < 1, "head.label_smoothing", "must be in [0, 1)")
        check(self.class_weight in CLASS_WEIGHTS, "head.class_weight", "none or balanced")
        check(self.select in SELECT, "head.select", f"must be one of {', '.join(SELECT)}")


@dataclass(frozen=True)
class FinetuneParams:
    """Fine-tuning the top blocks from the trained head (read by finetune)."""

    unfreeze: int = doc(
        "Top blocks of the backbone to train (0: the head only); at most the backbone's "
        "number of blocks."
    )
    lr_head: float = doc("Learning rate of the head.")
    lr_backbone: float = doc(
        "Learning rate of the unfrozen blocks; smaller than the head's, so the pretrained "
        "weights move gently."
    )
    weight_decay: float = doc("AdamW weight decay (not applied to biases and norms).")
    epochs: int = doc("Most epochs to train.")
    batch_size: int = doc("Images per training batch; a multiple of compute.nproc.")
    patience: int = doc("Stop after this many epochs without a better val `select` metric.")
    label_smoothing: float = doc("Cross-entropy label smoothing, in [0, 1).")
    class_weight: str = doc(CLASS_WEIGHT_DOC)
    sampler: str = doc(
        f"{' | '.join(SAMPLERS)}: `shuffle` visits every image once an epoch; `balanced` draws "
        "each batch's images with replacement, every class equally often (the same number of "
        "steps an epoch; deterministic from `seed`)."
    )
    select: str = doc(SELECT_DOC)
    augment: str = doc(
        f"Augmentation policy: {' | '.join(AUGMENTATIONS)}. `light`: small shifts, rotations "
        "and scale, no flips (digits, text). `photo`: random-resized crop, horizontal flip, "
        "mild colour jitter (natural images). `strong`: `photo` plus TrivialAugmentWide and "
        "random erasing. `none` computes the frozen blocks once and trains only the top."
    )
    mixup: float = doc(
        "MixUp alpha (torchvision's MixUp): 0 is off; 0.2 to 0.4 is typical. With `cutmix` "
        "too, each batch gets one of the two."
    )
    cutmix: float = doc("CutMix alpha (torchvision's CutMix): 0 is off; 1.0 is typical.")
    layer_decay: float = doc(
        "Layer-wise learning-rate decay in (0, 1]: the k-th unfrozen block below the top "
        "trains at lr_backbone x layer_decay^k (1.0: all at lr_backbone)."
    )
    ema: float = doc(
        "Decay of an exponential moving average of the weights, in [0, 1): 0 is off; e.g. "
        "0.999. When on, the averaged weights are validated and saved."
    )
    drop_path: float = doc(
        "Stochastic depth rate in [0, 1) for the trained blocks, for backbones that have it "
        "(timm models, efficientnet_lite*); 0 is off."
    )
    bn: str = doc(
        "`frozen` (keep the pretrained BatchNorm statistics) | `train` (re-estimate them)."
    )
    seed: int = doc("Seed for shuffling and augmentation.")

    def validate(self) -> None:
        check(self.unfreeze >= 0, "finetune.unfreeze", "must be >= 0 (0 trains the head only)")
        check(0 < self.lr_head <= MAX_LR, "finetune.lr_head", f"must be in (0, {MAX_LR:g}]")
        check(0 < self.lr_backbone <= MAX_LR, "finetune.lr_backbone", f"must be in (0, {MAX_LR:g}]")
        check(self.weight_decay >= 0, "finetune.weight_decay", "must be >= 0")
        check(self.epochs >= 1, "finetune.epochs", "must be >= 1")
        check(self.batch_size >= 1, "finetune.batch_size", "must be >= 1")
        check(self.patience >= 1, "finetune.patience", "must be >= 1")
        check(0 <= self.label_smoothing < 1, "finetune.label_smoothing", "must be in [0, 1)")
        check(self.class_weight in CLASS_WEIGHTS, "finetune.class_weight", "none or balanced")
        check(self.sampler in SAMPLERS, "finetune.sampler", f"must be one of {', '.join(SAMPLERS)}")
        check(self.select in SELECT, "finetune.select", f"must be one of {', '.join(SELECT)}")
        check(self.mixup >= 0, "finetune.mixup", "must be >= 0 (0 is off)")
        check(self.cutmix >= 0, "finetune.cutmix", "must be >= 0 (0 is off)")
        check(0 < self.layer_decay <= 1, "finetune.layer_decay", "must be in (0, 1] (1 is off)")
        check(0 <= self.ema < 1, "finetune.ema", "must be in [0, 1) (0 is off)")
        check(0 <= self.drop_path < 1, "finetune.drop_path", "must be in [0, 1) (0 is off)")
        check(
            self.augment in AUGMENTATIONS,
            "finetune.augment",
            f"must be one of {', '.join(AUGMENTATIONS)}",
        )
        check(self.bn in ("frozen", "train"), "finetune.bn", "must be 'frozen' or 'train'")


@dataclass(frozen=True)
class CompareParams:
    """The backbone leaderboard (read by the compare_* stages; docs/backbones.md)."""

    backbones: list[str] = doc(
        "Candidates, each a `backbone.name`: each one's features are extracted once and a head "
        "(the `head` params) trained on them; metrics/backbones.json ranks them on val."
    )
    weights: str = doc("`backbone.weights` for every candidate: `pretrained` or `none`.")
    image_size: int | str = doc("`backbone.image_size` for every candidate.")

    def validate(self) -> None:
        check(bool(self.backbones), "compare.backbones", "must name at least one backbone")
        for name in self.backbones:
            _check_backbone_name(name, "compare.backbones")
        repeated = sorted({n for n in self.backbones if self.backbones.count(n) > 1})
        check(not repeated, "compare.backbones", f"{', '.join(repeated)} listed twice")
        check(self.weights in ("pretrained", "none"), "compare.weights", "pretrained or none")
        _check_image_size(self.image_size, "compare.image_size")


@dataclass(frozen=True)
class Params:
    data: DataParams
    backbone: BackboneParams
    compute: ComputeParams
    inference: InferenceParams
    head: HeadParams
    finetune: FinetuneParams
    evaluate: EvaluateParams
    compare: CompareParams
    audit: AuditParams


def _section(cls: type, raw: Any, name: str) -> Any:
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: section {name!r} must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    expected = [f.name for f in fields(cls)]
    check_keys(raw, expected, "key", f"{name}.")
    section = cls(**{k: coerce(raw[k], hints[k], f"{name}.{k}") for k in expected})
    section.validate()
    return section


def parse_params(raw: Any) -> Params:
    """Validate an already-loaded params mapping."""
    if not isinstance(raw, dict):
        raise ParamsError("params.yaml: expected a mapping of sections at the top level")
    hints = typing.get_type_hints(Params)
    expected = [f.name for f in fields(Params)]
    # A renamed key is reported before the section it moved to is found missing.
    for old, new in RENAMED.items():
        section, _, key = old.partition(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise ParamsError(
                f"params.yaml: {old} is now {new}; move the value there (see CHANGELOG.md)"
            )
    check_keys(raw, expected, "section", "")
    params = Params(**{k: _section(hints[k], raw[k], k) for k in expected})
    spec = backbone_spec(params.backbone.name)  # a timm name: its config, no weights
    check(
        params.finetune.unfreeze <= spec.num_blocks,
        "finetune.unfreeze",
        f"{params.finetune.unfreeze} is more blocks than {params.backbone.name} has "
        f"({spec.num_blocks}); use 0..{spec.num_blocks}",
    )
    check(
        not spec.fixed_size or params.backbone.image_size in ("auto", spec.default_size),
        "backbone.image_size",
        f"{params.backbone.name} takes {spec.default_size} px only; set it to auto or "
        f"{spec.default_size}",
    )
    if params.finetune.drop_path and not spec.drop_path:
        raise ParamsError(drop_path_unsupported(params.backbone.name))
    check(
        params.finetune.batch_size % params.compute.nproc == 0,
        "finetune.batch_size",
        f"{params.finetune.batch_size} does not split evenly over compute.nproc "
        f"{params.compute.nproc} processes; make it a multiple of {params.compute.nproc}",
    )
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read, type-check and validate params.yaml; raise ParamsError naming the key on problems."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the project root, where params.yaml is")
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"))
    except YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from error
    return parse_params(raw)


def as_dict(section: Any) -> dict[str, Any]:
    """A params section as a plain dict, for checkpoint metadata."""
    return dataclasses.asdict(section)
