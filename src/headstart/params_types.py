"""The machinery under headstart.params: documented fields, type coercion in DVC's YAML 1.2
reading, and the checks whose errors name the key. params.py holds the sections themselves."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any

from ruamel.yaml import YAML

from headstart.errors import ParamsError

# Keys that moved: old key -> new key. Refused with an error naming the new one.
RENAMED = {"compute.batch_size": "inference.batch_size"}

# YAML 1.2 floats, for values that arrive as strings (e.g. from a hand-built mapping).
FLOAT_1_2 = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")


def doc(text: str) -> Any:
    """A dataclass field documented by `text` (no default: every key must be in params.yaml)."""
    return dataclasses.field(metadata={"doc": text})


def check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ParamsError(f"params.yaml: {key}: {problem}")


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Return `value` as the annotated type, or raise naming the key. Ints widen to floats."""
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    options = allowed or (annotation,)
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return finite(float(value), key)
        if option is float and isinstance(value, str) and FLOAT_1_2.match(value.strip()):
            return finite(float(value), key)
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is list and isinstance(value, list):
            (item,) = typing.get_args(option)
            return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ParamsError(
        f"params.yaml: {key}: expected {names}, got {type(value).__name__} {value!r}"
        + (" (write floats as 1.0e-3)" if float in options else "")
    )


def finite(value: float, key: str) -> float:
    """Refuse inf and nan: `x > 0` holds for inf, and a run would "succeed" with NaN weights."""
    if not math.isfinite(value):
        raise ParamsError(f"params.yaml: {key}: must be a finite number, got {value}")
    return value


def check_keys(raw: dict, expected: list[str], kind: str, prefix: str) -> None:
    """Refuse unknown and missing keys, naming the first of each."""
    unknown = sorted(set(raw) - set(expected))
    if unknown:
        raise ParamsError(
            f"params.yaml: unknown {kind} {prefix}{unknown[0]}; expected: {', '.join(expected)}"
        )
    missing = [k for k in expected if k not in raw]
    if missing:
        renamed_from = [old for old, new in RENAMED.items() if new == f"{prefix}{missing[0]}"]
        hint = f" (it was {renamed_from[0]})" if renamed_from else ""
        raise ParamsError(f"params.yaml: missing {kind} {prefix}{missing[0]}{hint}")


def read_yaml(text: str) -> Any:
    """Parse as DVC does: ruamel's safe loader, YAML 1.2 (`1e-3` is 0.001, `012` is 12, `on`
    is a string). Safe: tags that would construct Python objects are refused."""
    return YAML(typ="safe", pure=True).load(text)
