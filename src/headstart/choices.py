"""The names params.yaml (and the CLI) chooses among, where the registry behind them holds
torch code: headstart.params checks against these, so reading params.yaml never imports torch
(prepare starts without it). Each registry is keyed by exactly these names, in this order, which
tests/test_params.py checks; adding an entry is adding it here and to its registry.
"""

# head.kind: heads.HEADS.
HEADS = ("linear", "logreg")
# head.select and finetune.select: the val metric that picks the best epoch (train.fit).
SELECT = ("accuracy", "balanced_accuracy", "macro_f1")
# finetune.sampler: the order training visits the images in (loaders.sampling).
SAMPLERS = ("shuffle", "balanced")
# finetune.augment: transforms.AUGMENTATIONS.
AUGMENTATIONS = ("none", "light", "photo", "strong")
# evaluate.tta and predict --tta: inference.TTA_WRAPPERS.
TTA = ("none", "flip")
# evaluate.guard_foreign: familiarity.FOREIGN.
FOREIGN = ("noise", "blank", "photos")
# headstart export --format: export.EXPORT_FORMATS, each with the suffix that selects it (the
# CLI builds its help from these, so `headstart cache info` need not import torch).
EXPORT_SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
DEFAULT_EXPORT_FORMAT = "onnx"
