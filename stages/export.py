"""Stage export: the fine-tuned model as ONNX, for serving without headstart.

    python stages/export.py FINETUNED_MODEL CALIBRATION EXPORT

Writes EXPORT in the format its suffix names (headstart.export.EXPORT_FORMATS; the pipeline's
is models/finetuned.onnx: uint8 NCHW images at the model's input size in, probabilities out,
the calibration temperature built in) and its sidecar JSON (models/finetuned.onnx.json):
classes, input size, normalisation and preprocessing steps, as `headstart export` does.
CALIBRATION is the file evaluate writes beside the model. Reads no params.
"""

import argparse
import logging
from pathlib import Path

import _bootstrap  # noqa: F401  (first: a clear message outside the environment)

from headstart.calibration import read_temperature
from headstart.export import choose_format, export_model, export_paths
from headstart.io import write_bytes, write_json
from headstart.stage import run

log = logging.getLogger("headstart.export")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("finetuned_model", "calibration", "export"):
        parser.add_argument(name, type=Path)
    args = parser.parse_args(argv)
    format_name = choose_format(args.export, None)
    _, sidecar = export_paths(args.export, [args.finetuned_model, args.calibration], format_name)

    temperature = read_temperature(args.calibration, args.finetuned_model)
    data, description = export_model(format_name, args.finetuned_model, temperature)
    write_bytes(args.export, data)
    write_json(sidecar, description)
    log.info("exported %s (temperature %.4f) and %s", args.export, temperature, sidecar)


if __name__ == "__main__":
    raise SystemExit(run(main))
