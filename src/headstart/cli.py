"""The `headstart` command: predict with, describe, serve and export a fine-tuned model.

    headstart predict MODEL IMAGE_OR_FOLDER... [--top-k K] [--format table|csv|json]
                      [--calibration auto|none|FILE] [--tta none|flip]
                      [--guard auto|none|FILE]
    headstart info MODEL [--format text|json]
    headstart serve MODEL [--host 127.0.0.1] [--port 8000] [--max-body-mb 32] [--max-files 64]
    headstart export MODEL OUT [--format onnx|torchscript] [--calibration auto|none|FILE]
    headstart params [--format markdown]
    headstart cache info|prune|clear [--max-size SIZE] [--format text|json]

Exit codes: 0 all inputs predicted, 1 some input failed (each is reported with its reason),
2 the command could not run (bad arguments, a missing or unusable model or calibration file,
an output that cannot be written): one line on stderr, no traceback; 3 a bug in headstart
(the traceback is printed); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from headstart.errors import HeadstartError, UsageError

log = logging.getLogger("headstart.cli")

USAGE_ERROR = 2
INTERNAL_ERROR = 3


def _load_model(path: Path):
    from headstart.model import load_classifier

    if not path.is_file():
        raise UsageError(
            f"{path}: model file not found (expected a checkpoint like models/finetuned.pt)"
        )
    try:
        return load_classifier(path)
    except (HeadstartError, KeyError) as error:  # KeyError: metadata missing a field
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
    except (HeadstartError, KeyError) as error:  # KeyError: metadata missing a field
        raise UsageError(str(error)) from error
    log.info("calibration: temperature %.4f from %s", temperature, path)
    return temperature


def resolve_guard(model_path: Path, guard: str):
    """--guard: `auto` reads MODEL's guard file (models/finetuned.pt ->
    models/finetuned.guard.safetensors, written by evaluate) when there is one, `none` uses
    none (every `familiar` is null), anything else is a guard file's path."""
    from headstart.familiarity import guard_path, read_guard

    if guard == "none":
        return None
    path = guard_path(model_path) if guard == "auto" else Path(guard)
    if not path.is_file():
        if guard == "auto":
            log.info("no unfamiliar-image guard beside %s (%s)", model_path, path)
            return None
        raise UsageError(f"{path}: guard file not found")
    try:
        loaded = read_guard(path, model_path)
    except HeadstartError as error:
        raise UsageError(str(error)) from error
    log.info("unfamiliar-image guard: threshold %.4f from %s", loaded.threshold, path)
    return loaded


def cmd_predict(args: argparse.Namespace) -> int:
    from headstart.prediction import (
        format_csv,
        format_json,
        format_table,
        list_inputs,
        predict_files,
    )
    from headstart.runtime import resolve_device

    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be 0 or more, got {args.num_workers}")
    model, meta = _load_model(args.model)
    device = resolve_device(args.device, key="--device")
    temperature = resolve_temperature(args.model, args.calibration)
    guard = resolve_guard(args.model, args.guard)
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
        tta=args.tta,
        guard=guard,
    )
    formatter = {"table": format_table, "csv": format_csv, "json": format_json}[args.format]
    sys.stdout.write(formatter(results))
    failed = [r for r in results if not r.ok]
    if failed:
        log.warning("%d of %d input(s) could not be predicted", len(failed), len(results))
        return 1
    return 0


def model_info(path: Path) -> dict[str, Any]:
    from headstart.io import sha256_file

    model, meta = _load_model(path)
    return {
        "path": str(path),
        "sha256": sha256_file(path),
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
    except (HeadstartError, KeyError) as error:  # KeyError: metadata missing a field
        return {"file": str(calibration), "temperature": None, "error": str(error)}
    record = read_json(calibration)
    # Written by evaluate: the test metrics and the data they were measured on.
    return {
        "file": str(calibration),
        "temperature": temperature,
        "test": record.get("test", {}),
        "data_fingerprint": record.get("data_fingerprint"),
        "tta": record.get("tta", "none"),  # what the temperature was fitted with
    }


def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        return [item for k, v in value.items() for item in _flatten(f"{prefix}.{k}", v)]
    return [(prefix, value)]


def cmd_info(args: argparse.Namespace) -> int:
    from headstart.io import printable

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
    # For a terminal: control characters in class names or paths are shown escaped.
    sys.stdout.write("\n".join(printable(line) for line in lines) + "\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from headstart.calibration import calibration_path
    from headstart.export import choose_format, export_model, export_paths
    from headstart.io import write_bytes, write_json

    inputs = [args.model, calibration_path(args.model)]
    if args.calibration not in ("auto", "none"):
        inputs.append(Path(args.calibration))
    format_name = choose_format(args.out, args.format)
    out, side = export_paths(args.out, inputs, format_name)
    _load_model(args.model)  # a usage error (exit 2) for a missing or unusable model file
    temperature = resolve_temperature(args.model, args.calibration)
    data, description = export_model(format_name, args.model, temperature)
    write_bytes(out, data)
    write_json(side, description)
    sys.stdout.write(f"{out}\n{side}\n")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from headstart.prediction import Predictor
    from headstart.runtime import resolve_device
    from headstart.serve import Limits, Service, serve

    if args.max_body_mb <= 0 or args.max_files < 1:
        raise UsageError("--max-body-mb must be above 0 and --max-files at least 1")
    model, meta = _load_model(args.model)
    temperature = resolve_temperature(args.model, args.calibration)
    guard = resolve_guard(args.model, args.guard)
    device = resolve_device(args.device, key="--device")
    predictor = Predictor(
        model, meta, device=device, temperature=temperature, tta=args.tta, guard=guard
    )
    description = model_info(args.model) | {
        "temperature": temperature,
        "tta": args.tta,
        "guard": None
        if guard is None
        else {"neighbours": guard.neighbours, "threshold": guard.threshold},
    }
    limits = Limits(int(args.max_body_mb * (1 << 20)), args.max_files)
    serve(Service(predictor, description), args.host, args.port, limits)
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from headstart.params_doc import params_reference

    sys.stdout.write(params_reference())
    return 0


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def cmd_cache(args: argparse.Namespace) -> int:
    """The store of per-image work (docs/cache.md): what it holds, pruned, or emptied."""
    from headstart import store

    if args.action == "prune":
        cap = store.parse_size(args.max_size, "--max-size") if args.max_size else None
        done = store.prune(cap)
        sys.stdout.write(f"removed {done['removed']} entries, {_mib(done['bytes'])} left\n")
        return 0
    if args.action == "clear":
        sys.stdout.write(f"cleared {store.location()}: {_mib(store.clear())} freed\n")
        return 0
    found = store.info()
    if args.format == "json":
        sys.stdout.write(json.dumps(found, indent=2) + "\n")
        return 0
    lines = [
        f"location  {found['location']} ({'on' if found['on'] else 'off'})",
        f"size      {_mib(found['bytes'])} on disk, at most {_mib(found['max_bytes'])}",
    ]
    for kind, counts in found["kinds"].items():
        lines.append(
            f"{kind:<9} {counts['entries']} entries under {counts['keys']} "
            f"key{'' if counts['keys'] == 1 else 's'}, "
            f"{_mib(counts['bytes'])}"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from headstart.choices import DEFAULT_EXPORT_FORMAT, EXPORT_SUFFIXES, TTA

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
    predict.add_argument(
        "--tta",
        choices=TTA,
        default="none",
        help="test-time augmentation: flip averages the logits of each image and its mirror, "
        "as evaluate.tta: flip (default none)",
    )
    predict.add_argument(
        "--guard",
        default="auto",
        metavar="auto|none|FILE",
        help="unfamiliar-image guard: auto (default) uses MODEL's .guard.safetensors beside it "
        "when present; each image gets `familiar` and its `distance`",
    )
    predict.set_defaults(run=cmd_predict)

    info = commands.add_parser("info", help="describe a checkpoint")
    info.add_argument("model", type=Path)
    info.add_argument("--format", choices=("text", "json"), default="text")
    info.set_defaults(run=cmd_info)

    export = commands.add_parser(
        "export", help="write ONNX (or TorchScript) + sidecar JSON that run without headstart"
    )
    export.add_argument("model", type=Path)
    export.add_argument(
        "out", type=Path, help="e.g. model.onnx (sidecar model.onnx.json) or model.ts.pt"
    )
    export.add_argument(
        "--format",
        choices=sorted(EXPORT_SUFFIXES),
        default=None,
        help="default: the format whose suffix OUT ends with ("
        + ", ".join(f"{suffix}: {name}" for name, suffix in EXPORT_SUFFIXES.items())
        + f"), else {DEFAULT_EXPORT_FORMAT}",
    )
    export.add_argument(
        "--calibration",
        default="auto",
        metavar="auto|none|FILE",
        help="temperature built into the exported probabilities (as for predict)",
    )
    export.set_defaults(run=cmd_export)

    server = commands.add_parser("serve", help="answer predictions over HTTP (POST /predict)")
    server.add_argument("model", type=Path)
    server.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine)"
    )
    server.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    for name, what in (("calibration", "temperature"), ("guard", "unfamiliar-image guard")):
        server.add_argument(
            f"--{name}", default="auto", metavar="auto|none|FILE", help=f"{what}, as for predict"
        )
    server.add_argument("--tta", choices=TTA, default="none")
    server.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    server.add_argument(
        "--max-body-mb", type=float, default=32.0, help="largest request body (default 32)"
    )
    server.add_argument(
        "--max-files", type=int, default=64, help="most images in one request (default 64)"
    )
    server.set_defaults(run=cmd_serve)

    reference = commands.add_parser("params", help="every params.yaml key, with its meaning")
    reference.add_argument("--format", choices=("markdown",), default="markdown")
    reference.set_defaults(run=cmd_params)

    cache = commands.add_parser(
        "cache", help="the store of per-image features and validation (docs/cache.md)"
    )
    cache.add_argument(
        "action",
        choices=("info", "prune", "clear"),
        help="info: location, entries, size; prune: least recently used entries out until "
        "under the cap (HEADSTART_CACHE_SIZE, default 10G) or --max-size; clear: every entry "
        "(results never change: what is needed is computed again)",
    )
    cache.add_argument("--max-size", metavar="SIZE", help="for prune, e.g. 2G or 500M")
    cache.add_argument("--format", choices=("text", "json"), default="text", help="for info")
    cache.set_defaults(run=cmd_cache)
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
    except HeadstartError as error:  # what the user can fix; anything else is a bug
        print(f"headstart: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("headstart: interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug: its traceback, and a code no input problem gives
        traceback.print_exc()
        print("headstart: internal error (the traceback above); please report it", file=sys.stderr)
        return INTERNAL_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
