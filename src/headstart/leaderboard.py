"""The backbone leaderboard: which pretrained backbone suits this data, from cached features.

Each candidate in `compare.backbones` has its features extracted once (compare_extract) and a
head trained on them with the `head` params (compare_head); `rank` puts their validation
scores side by side. Only train and val are used: the test split stays unseen until the
chosen backbone's model is evaluated.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headstart.errors import MissingFileError
from headstart.io import read_json

if TYPE_CHECKING:
    from torch import nn

    from headstart.heads import Features

log = logging.getLogger(__name__)

# What the table ranks by, best first: val accuracy, then macro-F1 to break ties.
RANK_BY = ("val_accuracy", "val_macro_f1")
# compare_extract's measured speed, beside the candidate's features.
TIMING_FILE = "timing.json"


def score_head(features: Features, head: nn.Linear) -> dict[str, Any]:
    """The head's validation accuracy and macro-F1, with what the backbone costs."""
    import torch

    from headstart.metrics import classification_report

    with torch.inference_mode():
        predicted = head(torch.from_numpy(features.val_x)).argmax(1).numpy()
    report = classification_report(features.val_y, predicted, features.meta["classes"])
    return {
        "backbone": features.meta["backbone"]["name"],
        "val_accuracy": report["accuracy"],
        "val_macro_f1": report["macro_f1"],
        "num_features": features.meta["num_features"],
        "parameters": features.meta.get("parameters"),
        "image_size": features.meta["image_size"],
    }


def rank(
    names: list[str], scores: Path, features: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics/backbones.json, the plot's rows) from scores/<name>/head.json and
    features/<name>/timing.json."""
    rows = []
    for name in names:
        head_file, extract_file = scores / name / "head.json", features / name / TIMING_FILE
        for path in (head_file, extract_file):
            if not path.is_file():
                raise MissingFileError(
                    f"{path}: not found; run the leaderboard's stages (dvc repro compare)"
                )
        timing = read_json(extract_file)
        rows.append({**read_json(head_file), "images_per_second": timing["images_per_second"]})
    rows.sort(key=lambda row: tuple(-row[key] for key in RANK_BY))
    for place, row in enumerate(rows, start=1):
        row["rank"] = place
        log.info(
            "%d. %s: val accuracy %.4f, macro-F1 %.4f, %d features, %.0f images/s",
            place,
            row["backbone"],
            row["val_accuracy"],
            row["val_macro_f1"],
            row["num_features"],
            row["images_per_second"],
        )
    summary = {
        "best": rows[0]["backbone"],
        "ranked_by": list(RANK_BY),
        "backbones": {
            row["backbone"]: {k: v for k, v in row.items() if k != "backbone"} for row in rows
        },
    }
    return summary, rows
