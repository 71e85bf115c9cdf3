"""Rerun the pipeline from scratch in a temporary clone and compare its metrics with the
committed ones.

    python tools/reproduce_check.py                    # same machine: every value exactly equal
    python tools/reproduce_check.py --tolerance 0.01   # another machine: floats within 0.01

What it does:

1. `git clone` the repository at a commit (HEAD by default; uncommitted changes are not part
   of it) into a temporary folder, with its own empty DVC cache, so nothing is reused: no
   outputs, no run-cache.
2. Fetch the data sources (the `.dvc` files, e.g. `data/raw.dvc`) from this repository's DVC
   cache, or from the default remote when they are not in it. Everything else is recomputed.
3. `dvc repro --force` there (every stage runs), with this Python environment (`dvc` and
   `python` from it; the clone's own `src/` on PYTHONPATH).
4. Compare every value of the metrics files (the `metrics:` of dvc.yaml, top-level and per
   stage) with the committed files, print a table, exit 1 when any value is outside the
   tolerance.

Exact (the default) means equal values, and every output's hash equal to the committed
dvc.lock: on the machine that made the committed run the pipeline is byte-identical. With
`--tolerance X`, floating-point values (accuracy, F1, losses) may differ by at most X
(absolute); integers (image counts, epochs) must still be equal, and outputs that differ from
dvc.lock are listed but do not fail the check. Early stopping may pick another epoch on
another machine: restrict the check to the test metrics with `--metrics
metrics/evaluate.json` there. Across CPUs, pin `compute.precision: float32` first: with `auto`
one CPU may extract in bfloat16 and the other in float32, which moves results by more than
0.01.

Timings are measurements of the machine, not results: the leaderboard's extraction speed
(metric names ending in `seconds` or `images_per_second`) is shown but never compared, and the
files holding it (TIMED_OUTPUTS) may differ from dvc.lock.

Exit codes: 0 reproduced, 1 outside the tolerance (or a metric missing), 2 the rerun failed.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

Number = int | float


@dataclass(frozen=True)
class Row:
    """One metric, committed vs reproduced."""

    path: str
    name: str
    committed: Number | str | None
    reproduced: Number | str | None
    ok: bool

    @property
    def difference(self) -> float | None:
        if _is_number(self.committed) and _is_number(self.reproduced):
            return self.reproduced - self.committed
        return None


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def flatten(value, prefix: str = "") -> dict[str, Number | str]:
    """{"head": {"accuracy": 0.9}} -> {"head.accuracy": 0.9}: the leaves, as DVC names them."""
    if isinstance(value, Mapping):
        leaves: dict[str, Number | str] = {}
        for key, child in value.items():
            leaves.update(flatten(child, f"{prefix}.{key}" if prefix else str(key)))
        return leaves
    if isinstance(value, list):
        leaves = {}
        for index, child in enumerate(value):
            leaves.update(flatten(child, f"{prefix}.{index}" if prefix else str(index)))
        return leaves
    return {prefix: value}


def within(committed, reproduced, tolerance: float) -> bool:
    """Equal, or (floats only) no further apart than `tolerance`."""
    if not (_is_number(committed) and _is_number(reproduced)):
        return committed == reproduced
    if tolerance == 0.0 or (isinstance(committed, int) and isinstance(reproduced, int)):
        return committed == reproduced
    if math.isnan(committed) or math.isnan(reproduced):
        return math.isnan(committed) and math.isnan(reproduced)
    distance = abs(reproduced - committed)
    # 0.98 - 0.97 is 0.010000000000000009 in floats: a difference of exactly the tolerance
    # passes, whatever the last bit of its float says.
    return distance <= tolerance or math.isclose(distance, tolerance, rel_tol=1e-9)


# Metric names (last part) that are timings, and the outputs that hold such timings.
TIMINGS = ("seconds", "images_per_second")
TIMED_OUTPUTS = ("data/compare/*", "metrics/backbones.json", "plots/backbones.json")


def is_timing(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in TIMINGS


def compare(
    committed: Mapping[str, Mapping], reproduced: Mapping[str, Mapping], tolerance: float = 0.0
) -> list[Row]:
    """One Row per metric in either side, by file (in the given order) then metric name.

    A metric present on one side only is a failure.
    """
    rows = []
    for path in dict.fromkeys([*committed, *reproduced]):
        old = flatten(committed.get(path) or {})
        new = flatten(reproduced.get(path) or {})
        for name in sorted(set(old) | set(new)):
            present = name in old and name in new
            ok = present and (is_timing(name) or within(old[name], new[name], tolerance))
            rows.append(Row(path, name, old.get(name), new.get(name), ok))
    return rows


def _show(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return repr(value)  # every digit: "exact" must be checkable by eye
    return str(value)


def table(rows: Iterable[Row]) -> str:
    """A fixed-width table: path, metric, committed, reproduced, difference, ok/DIFF."""
    header = ("Path", "Metric", "Committed", "Reproduced", "Difference", "")
    lines = [
        (
            row.path,
            row.name,
            _show(row.committed),
            _show(row.reproduced),
            "" if row.difference in (None, 0) else f"{row.difference:+.6g}",
            "ok" if row.ok else "DIFF",
        )
        for row in rows
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines, strict=True)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *lines]
    )


def output_hashes(lock: Mapping | None) -> dict[str, str]:
    """{output path: md5} for every stage output recorded in a parsed dvc.lock."""
    stages = (lock or {}).get("stages") or {}
    return {
        out["path"]: out.get("md5", "")
        for stage in stages.values()
        for out in stage.get("outs") or []
    }


def changed_outputs(committed: Mapping[str, str], reproduced: Mapping[str, str]) -> list[str]:
    """Outputs whose hash differs, or that only one run recorded, in dvc.lock order; outputs
    holding timings (TIMED_OUTPUTS) aside."""
    return [
        path
        for path in dict.fromkeys([*committed, *reproduced])
        if committed.get(path) != reproduced.get(path)
        and not any(fnmatch.fnmatch(path, pattern) for pattern in TIMED_OUTPUTS)
    ]


def metrics_files(repo: Path) -> list[str]:
    """The metrics files of the repository's dvc.yaml: its top-level `metrics:`, then each
    stage's own `metrics:` (entries are a path, or a mapping of a path to its options)."""
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))
    entries = list(pipeline.get("metrics") or [])
    for stage in (pipeline.get("stages") or {}).values():
        entries += stage.get("metrics") or []
    paths = [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]
    # A matrix stage's paths name its item (`metrics/compare/${item.backbone}/head.json`):
    # every file that fits, one per candidate.
    expanded = []
    for path in paths:
        if "${" in path:
            pattern = re.sub(r"\$\{[^}]*\}", "*", path)
            expanded += sorted(p.relative_to(repo).as_posix() for p in repo.glob(pattern))
        else:
            expanded.append(path)
    return list(dict.fromkeys(expanded))


def read_metrics(repo: Path, paths: Iterable[str]) -> dict[str, dict | None]:
    """{path: parsed JSON, or None when the file is missing}."""
    found: dict[str, dict | None] = {}
    for path in paths:
        file = repo / path
        found[path] = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None
    return found


def committed_metrics(repo: Path, commit: str, paths: Iterable[str]) -> dict[str, dict | None]:
    """{path: parsed JSON as committed, or None when the commit does not have the file}."""
    found: dict[str, dict | None] = {}
    for path in paths:
        shown = subprocess.run(
            ["git", "show", f"{commit}:{path}"], cwd=repo, capture_output=True, text=True
        )
        found[path] = json.loads(shown.stdout) if shown.returncode == 0 else None
    return found


def _environment(clone: Path) -> dict[str, str]:
    env = dict(os.environ)
    # `dvc` and the stages' `python` from this environment; the clone's code, not ours.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(clone / "src")
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def _run(command: list[str], cwd: Path, env: dict[str, str], log=None) -> int:
    print("$", " ".join(command), flush=True)
    if log is None:
        return subprocess.run(command, cwd=cwd, env=env).returncode
    # The stages' progress bars go to the log; only DVC's stage lines reach the terminal.
    with subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as proc:
        for line in proc.stdout:
            log.write(line)
            if line.startswith(("Running stage", "Stage '", "ERROR")):
                print("  " + line.rstrip(), flush=True)
    return proc.returncode


def reproduce(source: Path, rev: str, workdir: Path) -> Path:
    """Clone `source` at `rev` into workdir/repo, fetch its data sources, run `dvc repro`."""
    clone = workdir / "repo"
    if subprocess.run(["git", "clone", "-q", "--no-checkout", str(source), str(clone)]).returncode:
        raise SystemExit(2)
    env = _environment(clone)
    if _run(["git", "checkout", "-q", rev], clone, env):
        raise SystemExit(2)

    # Data sources (`dvc add`ed folders) cannot be recomputed: take them from our cache.
    sources = subprocess.run(
        ["git", "ls-files", "*.dvc"], cwd=clone, capture_output=True, text=True, check=True
    ).stdout.split()
    if sources:
        cache = subprocess.run(
            ["dvc", "cache", "dir"], cwd=source, env=env, capture_output=True, text=True
        ).stdout.strip()
        _run(["dvc", "remote", "add", "--local", "reproduce-source", cache], clone, env)
        pulled = _run(["dvc", "pull", "-r", "reproduce-source", *sources], clone, env)
        if pulled and _run(["dvc", "pull", *sources], clone, env):  # the default remote
            print(f"could not get the data sources {sources}", file=sys.stderr)
            raise SystemExit(2)

    log_path = workdir / "repro.log"
    with open(log_path, "w", encoding="utf-8") as log:
        # --force: git-tracked outputs (metrics, curves) are already in the clone, and a stage
        # whose dependencies come out identical would otherwise keep the committed files.
        if _run(["dvc", "repro", "--force"], clone, env, log):
            print(f"dvc repro failed; its output is in {log_path}", file=sys.stderr)
            raise SystemExit(2)
    return clone


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="largest absolute difference allowed for floating-point metrics (default 0: exact)",
    )
    parser.add_argument("--rev", default="HEAD", help="the commit to reproduce (default HEAD)")
    parser.add_argument(
        "--metrics",
        nargs="+",
        metavar="PATH",
        help="metrics files to compare (default: every `metrics:` of dvc.yaml)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary clone (its path is printed)"
    )
    args = parser.parse_args(argv)
    if args.tolerance < 0:
        parser.error("--tolerance must be >= 0")

    source = Path(_git(Path.cwd(), "rev-parse", "--show-toplevel"))
    commit = _git(source, "rev-parse", args.rev)
    if _git(source, "status", "--porcelain", "--untracked-files=no"):
        print(f"note: uncommitted changes are not checked; reproducing {commit[:7]}")

    workdir = Path(tempfile.mkdtemp(prefix="reproduce-check-"))
    try:
        clone = reproduce(source, commit, workdir)
    except BaseException:
        print(f"kept the clone and its log in {workdir}", file=sys.stderr)
        raise
    paths = args.metrics or metrics_files(clone)
    rows = compare(
        committed_metrics(clone, commit, paths), read_metrics(clone, paths), args.tolerance
    )
    committed_lock = _git(clone, "show", f"{commit}:dvc.lock")
    reproduced_lock = (clone / "dvc.lock").read_text(encoding="utf-8")
    outputs = output_hashes(yaml.safe_load(committed_lock))
    different = changed_outputs(outputs, output_hashes(yaml.safe_load(reproduced_lock)))
    if args.keep:
        print(f"kept the clone in {clone}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(table(rows))
    failed = [row for row in rows if not row.ok]
    exact = args.tolerance == 0
    what = "exactly" if exact else f"within {args.tolerance:g}"
    print()
    if failed:
        print(f"{len(failed)} of {len(rows)} metrics not reproduced {what} ({commit[:7]})")
    else:
        print(f"all {len(rows)} metrics reproduced {what} ({commit[:7]})")
    # On the same machine every output is byte-identical: exact mode checks that too.
    if different:
        print(f"{len(different)} outputs differ from dvc.lock: {', '.join(different)}")
    else:
        print(f"all {len(outputs)} outputs byte-identical to dvc.lock")
    return 1 if failed or (exact and different) else 0


if __name__ == "__main__":
    sys.exit(main())
