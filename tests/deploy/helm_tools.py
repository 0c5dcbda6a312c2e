"""Rendering the chart for the tests: deploy/helm/render.py (Helm's engine through helm-python-sdk) with
the chart's defaults or a values file, and the rendered documents parsed."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "kunserve"
VALUES_ALL = Path(__file__).resolve().parent / "values-all.yaml"
RELEASE = "kunserve"
RELEASE_NAMESPACE = "kunserve-system"


def load_script(path: Path) -> ModuleType:
    """A script of the repository (not a package module) imported by path."""
    spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@functools.cache
def render_module() -> ModuleType:
    pytest.importorskip("helm_python", reason="helm-python-sdk (a dev dependency) renders the chart")
    return load_script(REPO / "deploy" / "helm" / "render.py")


def values_file(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    assert isinstance(loaded, dict)
    return loaded


@functools.cache
def _render_cached(values_json: str, namespace: str) -> dict[str, str]:
    rendered: dict[str, str] = render_module().render(json.loads(values_json), release=RELEASE, namespace=namespace)
    return rendered


def render(values: dict[str, Any] | None = None, namespace: str = RELEASE_NAMESPACE) -> dict[str, str]:
    """Template path -> text (cached per values: rendering costs ~0.1 s)."""
    return dict(_render_cached(json.dumps(values or {}, sort_keys=True), namespace))


def render_docs(values: dict[str, Any] | None = None, namespace: str = RELEASE_NAMESPACE) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = render_module().manifests(render(values, namespace))
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind} *{name_suffix}: {[d['metadata']['name'] for d in found]}"
    return found[0]
