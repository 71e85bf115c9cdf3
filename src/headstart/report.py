"""The model card: one Markdown page saying what the model is, what it was trained on, how well
it does and where it errs, written by evaluate and tracked by git.

It holds nothing that changes between two runs of the same pipeline on the same machine (no
dates, no absolute paths, numbers at fixed precision), so `git diff reports/model_card.md`
shows exactly how a new run changed the model: other data, other params, other metrics.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any

from headstart.folders import SPLITS

if TYPE_CHECKING:
    from headstart.index import Images

# Environment fields shown, in order (headstart.environment.describe's keys).
ENVIRONMENT_ROWS = (
    "python",
    "torch",
    "torchvision",
    "numpy",
    "pillow",
    "scikit-learn",
    "dvc",
    "platform",
    "cpu",
    "cpu_capability",
    "torch_threads",
    "device",
    "gpu",
    "cuda",
)
ENVIRONMENT_STAGES = ("extract", "train_head", "finetune", "evaluate")


def data_fingerprint(images: Images, classes: list[str]) -> str:
    """sha256 over the sorted "sha256,label,split" lines of the prepared index (label and split
    by name): the same images with the same labels and splits give the same fingerprint,
    wherever the folder is and whatever the files are called."""
    lines = sorted(
        f"{digest.decode()},{classes[label]},{SPLITS[split]}"
        for digest, label, split in zip(
            images.sha256.tolist(), images.labels.tolist(), images.splits.tolist(), strict=True
        )
    )
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: how far a test accuracy can be trusted."""
    if total == 0:
        return (0.0, 1.0)
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _cell(value: Any) -> str:
    """A Markdown table cell: pipes escaped, None as a dash."""
    if value is None:
        return "–"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]], align: str | None = None) -> list[str]:
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def _f(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _params_rows(section: str, values: dict[str, Any]) -> list[list[Any]]:
    return [[f"`{section}.{key}`", f"`{value}`"] for key, value in values.items()]


def render_model_card(
    *,
    model_meta: dict[str, Any],
    head_meta: dict[str, Any],
    model_file: dict[str, Any],
    data: dict[str, Any],
    metrics: dict[str, Any],
    reports: dict[str, dict],
    confused: list[dict],
    calibration: dict[str, Any],
    environment: dict[str, dict | None],
    audit: dict[str, Any] | None = None,
) -> str:
    """The model card as Markdown text.

    model_meta / head_meta: the checkpoints' metadata; model_file: {path, sha256,
    num_parameters}; data: {dir, fingerprint, report (prepare's report.json)}; metrics: what
    evaluate writes to metrics/evaluate.json; reports: classification_report per model;
    confused: most_confused() of the fine-tuned model; calibration: the record written beside
    the model; environment: headstart.environment records per stage; audit: the audit stage's
    metrics/audit.json, or None.
    """
    classes = model_meta["classes"]
    report = data["report"]
    test_images = metrics["test_images"]
    out: list[str] = []
    add = out.append

    add(f"# Model card: {model_meta['backbone']} fine-tuned on {len(classes)} classes")
    add("")
    add(
        "Written by the `evaluate` stage on every run; do not edit by hand. "
        "`git diff` on this file shows how the model changed."
    )
    add("")

    # ---- Model
    params = model_meta.get("params", {})
    backbone = params.get("backbone", {})
    add("## Model")
    add("")
    out += _table(
        ["", ""],
        [
            ["file", f"`{model_file['path']}`"],
            ["sha256", f"`{model_file['sha256']}`"],
            ["backbone", f"`{model_meta['backbone']}`"],
            ["backbone weights", f"`{backbone.get('weights', 'unknown')}`"],
            ["parameters", f"{model_file['num_parameters']:,}"],
            ["input", f"RGB, {model_meta['image_size']} x {model_meta['image_size']} px"],
            ["normalisation", f"mean {model_meta['mean']}, std {model_meta['std']}"],
            ["classes", ", ".join(classes)],
            ["calibration", _calibration_line(calibration)],
            ["test-time augmentation", _tta_line(calibration.get("tta", "none"))],
            ["unfamiliar images", _guard_line(metrics.get("guard"))],
        ],
    )
    add("")
    add(
        "Use: `headstart predict "
        f"{model_file['path']} IMAGE_OR_FOLDER...` (preprocessing is read from the file; the "
        "calibration file beside it is applied when present); "
        f"`headstart export {model_file['path']} model.onnx` for ONNX (onnxruntime)."
    )
    add("")

    # ---- Data
    add("## Data")
    add("")
    add(
        f"`{data['dir']}` ({report.get('layout', 'class folders')}): "
        f"{report['num_images']} images in {report['num_classes']} classes, "
        f"{report['num_skipped']} file(s) skipped."
    )
    add("")
    add(f"Data fingerprint (sha256 of image hashes, labels and splits): `{data['fingerprint']}`")
    add("")
    counts = report["counts"]
    out += _table(
        ["class", *SPLITS, "total"],
        [
            [name, *(counts[name][s] for s in SPLITS), sum(counts[name][s] for s in SPLITS)]
            for name in classes
        ]
        + [
            [
                "**total**",
                *(report["splits"][s] for s in SPLITS),
                sum(report["splits"][s] for s in SPLITS),
            ]
        ],
        "lrrrr",
    )
    if report.get("skipped_by_reason"):
        add("")
        add(
            "Skipped: "
            + ", ".join(f"{n} {reason}" for reason, n in report["skipped_by_reason"].items())
            + " (every file and its reason: `data/prepared/report.json`)."
        )
    if report.get("near_copy_groups"):
        add("")
        add(
            f"{report['near_copy_groups']} groups of near-copies ({report['near_copy_images']} "
            "images with equal perceptual hashes) were each kept in one split."
        )
    add("")
    add(_audit_line(audit))
    add("")

    # ---- Training
    add("## Training")
    add("")
    head_summary = head_meta.get("summary", {})
    summary = model_meta.get("summary", {})
    add(
        f"1. Head on cached features: best epoch {head_summary.get('best_epoch', '–')}, "
        f"validation accuracy {_f(head_summary.get('best_val_accuracy'))}."
    )
    if summary.get("best_epoch") == 0:
        add(
            "2. Fine-tuned from that head: no epoch beat the starting linear probe on "
            f"validation ({_f(summary.get('val_accuracy'))}), so the shipped model is the probe: "
            "the pretrained backbone with the head above."
        )
    else:
        add(
            f"2. Fine-tuned from that head: best epoch {summary.get('best_epoch', '–')}, "
            f"validation accuracy {_f(summary.get('val_accuracy'))}"
            + (
                f" (the probe it started as: {_f(summary['probe_val_accuracy'])})."
                if summary.get("probe_val_accuracy") is not None
                else "."
            )
        )
    add("")
    rows = _params_rows("backbone", backbone)
    rows += _params_rows("head", head_meta.get("params", {}))
    rows += _params_rows("finetune", params.get("finetune", {}))
    out += _table(["param", "value"], rows)
    add("")

    # ---- Test metrics
    add(f"## Test metrics ({test_images} images)")
    add("")
    metric_rows = []
    for name, label in (("head", "head on cached features"), ("finetuned", "fine-tuned")):
        m = metrics[name]
        correct = round(m["accuracy"] * test_images)
        low, high = wilson_interval(correct, test_images)
        balanced = _f(m["balanced_accuracy"]) if "balanced_accuracy" in m else "–"
        interval = f"{low:.3f} – {high:.3f}"
        metric_rows.append(
            [label, _f(m["accuracy"]), interval, balanced, _f(m["macro_f1"]), _f(m["ece"])]
        )
    header = ["model", "accuracy", "95% interval", "balanced accuracy", "macro-F1", "ECE"]
    out += _table(header, metric_rows, "lrrrrr")
    add("")
    add("Per class, fine-tuned (head's F1 for comparison):")
    add("")
    out += _table(
        ["class", "precision", "recall", "F1", "head F1", "support"],
        [
            [
                name,
                _f(reports["finetuned"]["per_class"][name]["precision"], 3),
                _f(reports["finetuned"]["per_class"][name]["recall"], 3),
                _f(reports["finetuned"]["per_class"][name]["f1"], 3),
                _f(reports["head"]["per_class"][name]["f1"], 3),
                reports["finetuned"]["per_class"][name]["support"],
            ]
            for name in classes
        ],
        "lrrrrr",
    )
    add("")

    # ---- Confusions
    add("## Most confused classes (fine-tuned, test)")
    add("")
    if confused:
        out += _table(
            ["actual", "predicted as", "images", "share of the actual class"],
            [[c["actual"], c["predicted"], c["count"], f"{c['share']:.1%}"] for c in confused],
            "llrr",
        )
    else:
        add("No test image was misclassified.")
    add("")
    add(
        "Pictures: `plots/confusion_finetuned.png`, `plots/worst_misclassified.png` "
        "(the most confident mistakes)."
    )
    add("")

    # ---- Calibration
    add("## Calibration")
    add("")
    add(
        "Expected calibration error (15 equal-width bins of the top probability; 0 is perfect): "
        "how far the stated probabilities are from the observed accuracy."
    )
    add("")
    finetuned = metrics["finetuned"]
    cal_rows = [
        ["head on cached features", _f(metrics["head"]["ece"])],
        ["fine-tuned", _f(finetuned["ece"])],
    ]
    if calibration.get("fitted"):
        cal_rows.append(
            [
                f"fine-tuned, temperature {calibration['temperature']:.4f}",
                _f(finetuned["ece_calibrated"]),
            ]
        )
    out += _table(["model", "test ECE"], cal_rows, "lr")
    add("")
    if calibration.get("fitted"):
        add(
            f"The temperature was fitted on the {calibration['val_images']} validation images "
            f"(NLL {calibration['val_nll_before']:.4f} -> {calibration['val_nll_after']:.4f}); "
            "it changes probabilities, never the predicted class. "
            f"{_temperature_meaning(calibration['temperature'])}"
        )
    else:
        add("No temperature fitted (`evaluate.calibrate: false`): probabilities are as trained.")
    add("")

    # ---- Environment
    add("## Environment")
    add("")
    stages = [s for s in ENVIRONMENT_STAGES if s in environment]
    rows = []
    for key in ENVIRONMENT_ROWS:
        values = [_environment_value(environment[s], key) for s in stages]
        if any(v is not None for v in values):
            rows.append([key, *values])
    out += _table(["", *stages], rows)
    add("")
    return "\n".join(out)


def _calibration_line(calibration: dict[str, Any]) -> str:
    if not calibration.get("fitted"):
        return "none (`evaluate.calibrate: false`)"
    return f"temperature {calibration['temperature']:.4f}, in `{calibration['file']}`"


def _audit_line(audit: dict[str, Any] | None) -> str:
    """The data audit's counts (metrics/audit.json) and where its reports are."""
    where = "[audit.md](audit.md), written by the audit stage"
    if not audit:
        return (
            "Data audit (likely label mistakes, near-duplicates and leaks across splits, "
            f"outliers, a cross-validated accuracy): {where}."
        )
    duplicates = audit.get("near_duplicates", {})
    cv = audit.get("cv_accuracy", {})
    found = [
        f"{audit.get('label_issues', 0)} likely label mistakes "
        "([label_issues.csv](label_issues.csv))",
        f"{duplicates.get('groups', 0)} groups of near-duplicates "
        f"({duplicates.get('cross_split', 0)} across splits, "
        f"{duplicates.get('cross_class', 0)} across classes; "
        "[near_duplicates.csv](near_duplicates.csv))",
        f"{audit.get('outliers', 0)} outliers ([outliers.csv](outliers.csv))",
    ]
    return (
        f"Data audit ({where}): {', '.join(found)}; a logistic-regression head's "
        f"cross-validated accuracy {_f(cv.get('mean'))} ± {_f(cv.get('std'))} over "
        f"{cv.get('folds', '?')} folds."
    )


def _guard_line(guard: dict[str, Any] | None) -> str:
    """What the unfamiliar-image guard flags (headstart.familiarity), from evaluate's metrics."""
    if not guard:
        return "no guard"
    caught = ", ".join(f"{share:.0%} of {name}" for name, share in guard["foreign_caught"].items())
    return (
        f"flagged when the mean distance to the {guard['neighbours']} nearest train images "
        f"exceeds {guard['threshold']:.4f}: {guard['val_flagged']:.1%} of val, "
        f"{guard['test_flagged']:.1%} of test" + (f"; caught {caught}" if caught else "")
    )


def _tta_line(tta: str) -> str:
    if tta == "flip":
        return (
            "flip: the mean of the logits of each image and of its mirror, on val and test "
            "(`headstart predict --tta flip` does the same; the head on cached features: none)"
        )
    return "none"


def _temperature_meaning(temperature: float) -> str:
    if temperature < 1:
        return "Below 1: the model was underconfident (label smoothing does this)."
    if temperature > 1:
        return "Above 1: the model was overconfident."
    return ""


def _environment_value(record: dict | None, key: str) -> Any:
    if record is None:
        return None
    if key in record:
        return record[key]
    return record.get("packages", {}).get(key)
