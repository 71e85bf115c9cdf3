"""bench/gpu_check.py cannot rot unseen: its dry run (tiny, the CPU standing in for CUDA) goes
through every step, and without a CUDA device it stops with one line and exit code 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def _gpu_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_dry_run_goes_through_every_step():
    result = _gpu_check("--dry-run")
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    rows = {" ".join(line.split()[:-4]): line.split()[-4:] for line in lines[2:5]}
    assert list(rows) == ["gpu 1", "gpu 2", "cpu"], result.stdout
    assert [row[0] for row in rows.values()] == ["100", "100", "60"], result.stdout
    for _, extract, finetune, accuracy in rows.values():
        assert float(extract) > 0 and float(finetune) > 0 and 0 <= float(accuracy) <= 1
    # Two runs with the same params on the same machine: the same bytes (the six feature
    # arrays, head.pt and finetuned.pt), as the pipeline promises.
    assert "the two GPU runs' 8 feature and model files: byte-identical" in result.stdout
    assert "(the CPU run had 60 of the 100 images)" in result.stdout
    assert re.fullmatch(
        r"gpu_speedup_extract=\d+\.\d\d gpu_speedup_finetune=\d+\.\d\d gpu_identical=True",
        lines[-1],
    ), result.stdout


def test_without_cuda_it_says_so_in_one_line_and_exits_2():
    result = _gpu_check("--images", "10", CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "no CUDA device" in result.stderr, result.stderr
