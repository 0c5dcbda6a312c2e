"""ServingPool objects for the operator tests: the repository's examples, with metadata an API server adds."""

from __future__ import annotations

import copy
from typing import Any

from tests.deploy.crd_tools import EXAMPLES_DIR, load_one

SMOLLM2 = EXAMPLES_DIR / "servingpool-smollm2.yaml"
GPU = EXAMPLES_DIR / "servingpool-gpu.yaml"


def example(path: Any = SMOLLM2, *, name: str | None = None, namespace: str = "ns", uid: str = "uid-1",
            generation: int = 1) -> dict[str, Any]:
    """The example as the API server stores it (namespace, uid, generation set)."""
    body = load_one(path)
    body["metadata"].update(namespace=namespace, uid=uid, generation=generation)
    if name is not None:
        body["metadata"]["name"] = name
    return body


def with_spec(body: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of body whose spec has `changes` merged in (a value of None deletes the key)."""
    out = copy.deepcopy(body)
    _merge(out["spec"], changes)
    return out


def _merge(target: dict[str, Any], changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
