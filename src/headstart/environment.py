"""What machine and software produced a result: recorded beside every model, features and metrics.

Two runs of the pipeline on one machine give byte-identical outputs; on two machines they may
differ in the last digits (another CPU's vector instructions, another thread count), or by
more when `compute.precision: auto` picks bfloat16 on one and float32 on the other. This
record is what lets a reader of `dvc metrics diff` tell why. It holds nothing that changes
between two runs on the same machine (no time, no host name, no paths), so recording it keeps
outputs byte-identical there.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

import torch

from headstart.runtime import precision_name

# Packages whose versions can change a result, in the order shown.
PACKAGES = ("torch", "torchvision", "timm", "numpy", "pillow", "scikit-learn", "dvc")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe(
    device: torch.device | str | None = None,
    precision: torch.dtype | None = None,
    processes: int = 1,
) -> dict:
    """The environment of this process, as a JSON-ready dict; `device` is the one computing,
    `precision` its autocast dtype (None: float32), `processes` how many computed together
    (torchrun; the threads are each one's)."""
    device = torch.device(device or "cpu")
    record = {
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "device": device.type,
        "precision": precision_name(precision),
        "processes": processes,
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        record["gpu"] = torch.cuda.get_device_name(index)
        record["cuda"] = torch.version.cuda
        record["cudnn"] = torch.backends.cudnn.version()
    return record
