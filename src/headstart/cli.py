"""The `headstart` command: predict with, describe and export a fine-tuned model.

    headstart predict MODEL IMAGE_OR_FOLDER... [--top-k K] [--format table|csv|json]
                      [--calibration auto|none|FILE]
    headstart info MODEL [--format text|json]
    headstart export MODEL OUT --format torchscript [--calibration auto|none|FILE]

Preprocessing always comes from the checkpoint's metadata and images are decoded by the same
function as in training, so predictions match what evaluate measured. A file that cannot be
used is reported with its reason and the rest are still predicted; exit codes: 0 all inputs
predicted, 1 some input failed, 2 usage error (bad arguments, missing or unusable model).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("headstart.cli")

USAGE_ERROR = 2
# Below this many inputs a progress bar is noise.
PROGRESS_MIN_FILES = 16


class UsageError(Exception):
    """Bad arguments or an unusable model: one line on stderr, exit code 2."""


@dataclass
class Prediction:
    path: str
    classes: list[str] = field(default_factory=list)  # best first
    probabilities: list[float] = field(default_factory=list)
    reason: str | None = None  # an UnusableImage reason code (or not_found) when it failed
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "predictions": [
                {"class": c, "probability": p}
                for c, p in zip(self.classes, self.probabilities, strict=True)
            ],
            "error": None if self.ok else {"reason": self.reason, "detail": self.detail},
        }


# --------------------------------------------------------------------------------------------
# Inputs


def list_inputs(arguments: list[Path]) -> list[Path]:
    """Files as given; folders walked recursively in sorted order, hidden files skipped."""
    from headstart.data import is_hidden

    paths: list[Path] = []
    for argument in arguments:
        if not argument.is_dir():
            paths.append(argument)  # a missing file is reported as not_found, per file
            continue
        for dirpath, dirnames, filenames in os.walk(argument):
            dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
            paths.extend(Path(dirpath) / name for name in sorted(filenames) if not is_hidden(name))
    return paths


class _InputDataset:
    """Item i: (i, image tensor or None, reason, detail); decoding errors are data, not raised."""

    def __init__(self, paths: list[Path], transform, decode_size: int):
        self.paths = paths
        self.transform = transform
        self.decode_size = decode_size  # as in training: see data.ImageDataset

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from headstart.images import UnusableImage, decode_image

        path = self.paths[index]
        if not path.is_file():
            return index, None, "not_found", "no such file"
        try:
            image = decode_image(path, self.decode_size).image
        except UnusableImage as error:
            return index, None, error.reason, error.detail
        return index, self.transform(image), None, ""


def _collate(items):
    return items  # images stacked in predict_files, after the failed ones are set aside


# --------------------------------------------------------------------------------------------
# Predict


def predict_files(
    model,
    meta: dict[str, Any],
    paths: list[Path],
    *,
    top_k: int,
    batch_size: int,
    device,
    num_workers: int = 0,
    temperature: float = 1.0,
) -> list[Prediction]:
    """Top-k probabilities, softmax(logits / temperature), for every path, in input order;
    failures carry a reason. The temperature (headstart.calibration) never changes the order
    of the classes, only how sure the model says it is."""
    import torch
    from tqdm import tqdm

    from headstart.data import eval_transform

    transform = eval_transform(meta["image_size"], meta["mean"], meta["std"])
    classes = meta["classes"]
    loader = torch.utils.data.DataLoader(
        _InputDataset(paths, transform, meta["image_size"]),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    results: list[Prediction] = [Prediction(str(p)) for p in paths]
    model.eval().to(device, memory_format=torch.channels_last)  # as evaluate runs it
    progress = tqdm(
        total=len(paths),
        desc="predict",
        unit="img",
        file=sys.stderr,
        disable=True if len(paths) < PROGRESS_MIN_FILES else None,  # None: only on a terminal
    )
    with torch.inference_mode(), progress:
        for items in loader:
            good = []
            for index, image, reason, detail in items:
                if image is None:
                    results[index].reason, results[index].detail = reason, detail
                else:
                    good.append((index, image))
            if good:
                images = torch.stack([image for _, image in good])  # (B, 3, S, S)
                images = images.to(device, memory_format=torch.channels_last)
                logits = model(images).float()  # (B, num_classes)
                probabilities = torch.softmax(logits / temperature, dim=1).cpu()
                top = probabilities.topk(min(top_k, len(classes)), dim=1)  # sorted, best first
                for row, (index, _) in enumerate(good):
                    results[index].classes = [classes[i] for i in top.indices[row].tolist()]
                    results[index].probabilities = top.values[row].tolist()
            progress.update(len(items))
    # Logged after the loop so the messages do not tear the progress bar.
    for result in results:
        if not result.ok:
            log.warning("%s: %s: %s", result.path, result.reason, result.detail)
    return results


def format_table(results: list[Prediction]) -> str:
    width = max((len(r.path) for r in results), default=4)
    lines = [f"{'path':<{width}}  predictions"]
    for result in results:
        if result.ok:
            text = "  ".join(
                f"{c} ({p:.3f})" for c, p in zip(result.classes, result.probabilities, strict=True)
            )
        else:
            text = f"ERROR {result.reason}: {result.detail}"
        lines.append(f"{result.path:<{width}}  {text}")
    return "\n".join(lines) + "\n"


def format_csv(results: list[Prediction]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "rank", "class", "probability", "error"])
    for result in results:
        if not result.ok:
            writer.writerow([result.path, "", "", "", f"{result.reason}: {result.detail}"])
        for rank, (c, p) in enumerate(zip(result.classes, result.probabilities, strict=True), 1):
            writer.writerow([result.path, rank, c, f"{p:.6f}", ""])
    return buffer.getvalue()


def format_json(results: list[Prediction]) -> str:
    return json.dumps([r.as_json() for r in results], indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------------------------
# Commands


def _load_model(path: Path):
    from headstart.model import load_classifier

    if not path.is_file():
        raise UsageError(
            f"{path}: model file not found (expected a checkpoint like models/finetuned.pt)"
        )
    try:
        return load_classifier(path)
    except (ValueError, KeyError) as error:
        raise UsageError(f"{path}: not a usable fine-tuned model: {error}") from error


def resolve_temperature(model_path: Path, calibration: str) -> float:
    """--calibration: `auto` applies MODEL's calibration file (models/finetuned.pt ->
    models/finetuned.calibration.json, written by evaluate) when there is one, `none` applies
    nothing, anything else is a calibration file's path. A file fitted for another version of
    the model is refused, with the fix."""
    from headstart.calibration import calibration_path, read_temperature

    if calibration == "none":
        return 1.0
    path = calibration_path(model_path) if calibration == "auto" else Path(calibration)
    if not path.is_file():
        if calibration == "auto":
            return 1.0
        raise UsageError(f"{path}: calibration file not found")
    try:
        temperature = read_temperature(path, model_path)
    except (ValueError, KeyError) as error:
        raise UsageError(str(error)) from error
    log.info("calibration: temperature %.4f from %s", temperature, path)
    return temperature


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cmd_predict(args: argparse.Namespace) -> int:
    from headstart.model import resolve_device

    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be 0 or more, got {args.num_workers}")
    model, meta = _load_model(args.model)
    try:
        device = resolve_device(args.device)
    except RuntimeError as error:
        raise UsageError(str(error).replace("compute.device", "--device")) from error
    temperature = resolve_temperature(args.model, args.calibration)
    paths = list_inputs(args.inputs)
    if not paths:
        raise UsageError(f"no files found in {', '.join(map(str, args.inputs))}")
    results = predict_files(
        model,
        meta,
        paths,
        top_k=args.top_k,
        batch_size=args.batch_size,
        device=device,
        num_workers=args.num_workers,
        temperature=temperature,
    )
    formatter = {"table": format_table, "csv": format_csv, "json": format_json}[args.format]
    sys.stdout.write(formatter(results))
    failed = [r for r in results if not r.ok]
    if failed:
        log.warning("%d of %d input(s) could not be predicted", len(failed), len(results))
        return 1
    return 0


def model_info(path: Path) -> dict[str, Any]:
    model, meta = _load_model(path)
    return {
        "path": str(path),
        "sha256": _sha256(path),
        "size_bytes": path.stat().st_size,
        "backbone": meta["backbone"],
        "num_classes": len(meta["classes"]),
        "classes": meta["classes"],
        "image_size": meta["image_size"],
        "mean": meta["mean"],
        "std": meta["std"],
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "params": meta.get("params", {}),
        "summary": meta.get("summary", {}),
        "calibration": _calibration_info(path),
        "environment": meta.get("environment", {}),
    }


def _calibration_info(path: Path) -> dict[str, Any]:
    """The calibration file evaluate writes beside the model, if any and if it belongs to this
    version of the model: the temperature, the test metrics and the data fingerprint."""
    from headstart.calibration import calibration_path, read_temperature
    from headstart.io import read_json

    calibration = calibration_path(path)
    if not calibration.is_file():
        return {"file": None, "temperature": 1.0}
    try:
        temperature = read_temperature(calibration, path)
    except (ValueError, KeyError) as error:
        return {"file": str(calibration), "temperature": None, "error": str(error)}
    record = read_json(calibration)
    # Written by evaluate: the test metrics and the data they were measured on.
    return {
        "file": str(calibration),
        "temperature": temperature,
        "test": record.get("test", {}),
        "data_fingerprint": record.get("data_fingerprint"),
    }


def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        return [item for k, v in value.items() for item in _flatten(f"{prefix}.{k}", v)]
    return [(prefix, value)]


def cmd_info(args: argparse.Namespace) -> int:
    info = model_info(args.model)
    if args.format == "json":
        sys.stdout.write(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        return 0
    lines = []
    for key, value in info.items():
        if key in ("params", "summary", "calibration", "environment"):
            lines.extend(f"{k}: {v}" for k, v in _flatten(key, value))
        elif key == "classes":
            lines.append(f"classes: {', '.join(value)}")
        else:
            lines.append(f"{key}: {value}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from headstart.export import export_torchscript
    from headstart.io import write_bytes, write_json

    out: Path = args.out
    side = out.with_suffix(".json")
    if side == out:
        raise UsageError(f"{out}: the sidecar would overwrite the export; use e.g. model.pt")
    _load_model(args.model)  # a usage error (exit 2) for a missing or unusable model file
    temperature = resolve_temperature(args.model, args.calibration)
    data, description = export_torchscript(args.model, temperature)
    write_bytes(out, data)
    write_json(side, description)
    sys.stdout.write(f"{out}\n{side}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headstart",
        description=__doc__.splitlines()[0].removeprefix("The `headstart` command: "),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    predict = commands.add_parser("predict", help="classify image files and folders")
    predict.add_argument("model", type=Path, help="checkpoint, e.g. models/finetuned.pt")
    predict.add_argument(
        "inputs", type=Path, nargs="+", metavar="IMAGE_OR_FOLDER", help="folders are recursive"
    )
    predict.add_argument("--top-k", type=int, default=1, help="classes per image (default 1)")
    predict.add_argument("--format", choices=("table", "csv", "json"), default="table")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    predict.add_argument("--num-workers", type=int, default=0, help="decoding processes")
    predict.add_argument(
        "--calibration",
        default="auto",
        metavar="auto|none|FILE",
        help="temperature for the probabilities: auto (default) uses MODEL's .calibration.json "
        "beside it when present",
    )
    predict.set_defaults(run=cmd_predict)

    info = commands.add_parser("info", help="describe a checkpoint")
    info.add_argument("model", type=Path)
    info.add_argument("--format", choices=("text", "json"), default="text")
    info.set_defaults(run=cmd_info)

    export = commands.add_parser(
        "export", help="write TorchScript + sidecar JSON that load without headstart"
    )
    export.add_argument("model", type=Path)
    export.add_argument("out", type=Path, help="e.g. model.ts.pt; the sidecar is OUT.json")
    export.add_argument("--format", choices=("torchscript",), default="torchscript")
    export.add_argument(
        "--calibration",
        default="auto",
        metavar="auto|none|FILE",
        help="temperature built into the exported probabilities (as for predict)",
    )
    export.set_defaults(run=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, message already printed)
        return int(exit_.code or 0)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.run(args)
    except UsageError as error:
        print(f"headstart: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("headstart: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
