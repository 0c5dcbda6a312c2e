"""`SpecReader`: typed, bounded reads from a JSON object that record problems instead of raising.

The building block of `validation.parse_pool` (and of the Reconfiguration spec checks to come).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from kunserve.operator.pool_spec import SpecProblem

POOL_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
ABS_PATH = re.compile(r"^(/[^/]+)+$")


class SpecReader:
    """Typed, bounded reads from a JSON mapping that record problems instead of raising."""

    def __init__(self, problems: list[SpecProblem]) -> None:
        self.problems = problems

    def bad(self, path: str, message: str) -> None:
        self.problems.append(SpecProblem(path, message))

    def obj(self, raw: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
        value = raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.bad(f"{path}.{key}", f"must be an object, got {type(value).__name__}")
            return {}
        return value

    def int_(self, raw: Mapping[str, Any], key: str, path: str, default: int | None,
             lo: int, hi: int) -> int | None:
        value = raw.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.bad(f"{path}.{key}", f"must be an integer, got {value!r}")
            return default
        if not lo <= value <= hi:
            self.bad(f"{path}.{key}", f"must be between {lo} and {hi}, got {value}")
        return value

    def num(self, raw: Mapping[str, Any], key: str, path: str, default: float | None,
            lo: float, hi: float, *, exclusive_lo: bool = False) -> float | None:
        value = raw.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self.bad(f"{path}.{key}", f"must be a number, got {value!r}")
            return default
        if value < lo or value > hi or (exclusive_lo and value == lo):
            low = f"greater than {lo}" if exclusive_lo else f"at least {lo}"
            self.bad(f"{path}.{key}", f"must be {low} and at most {hi}, got {value}")
        return float(value)

    def str_(self, raw: Mapping[str, Any], key: str, path: str, default: str | None = None, *,
             pattern: re.Pattern[str] | None = None, max_len: int = 4096, required: bool = False) -> str | None:
        value = raw.get(key, default)
        if value is None or value == "":
            if required:
                self.bad(f"{path}.{key}", "is required and must not be empty")
            return None
        if not isinstance(value, str):
            self.bad(f"{path}.{key}", f"must be a string, got {value!r}")
            return default
        if len(value) > max_len:
            self.bad(f"{path}.{key}", f"must be at most {max_len} characters")
        elif pattern is not None and not pattern.match(value):
            self.bad(f"{path}.{key}", f"{value!r} does not match {pattern.pattern}")
        return value

    def bool_(self, raw: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        value = raw.get(key, default)
        if not isinstance(value, bool):
            self.bad(f"{path}.{key}", f"must be true or false, got {value!r}")
            return default
        return value

    def enum(self, raw: Mapping[str, Any], key: str, path: str, kind: type[Any], default: Any) -> Any:
        value = raw.get(key, default)
        if value is None:
            return None
        try:
            return kind(value)
        except ValueError:
            self.bad(f"{path}.{key}", f"must be one of {[m.value for m in kind]}, got {value!r}")
            return default
