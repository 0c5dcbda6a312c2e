"""Render the KunServe Helm chart with Helm's own engine (the Go SDK embedded in `helm-python-sdk`), no helm
binary needed: the same templates, values coalescing and values.schema.json checks as `helm template`.

    python deploy/helm/render.py                                   # default values, manifests to stdout
    python deploy/helm/render.py -f my-values.yaml -n serving --out build/manifests
    python deploy/helm/render.py --include-crds | kubectl apply -f -   # what `helm install` would create
    python deploy/helm/render.py --lint                            # `helm lint --strict` of the chart

`make helm-render` runs it (HELM_VALUES=..., HELM_NAMESPACE=..., HELM_OUT=dir).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent / "kunserve"
KUBE_VERSION = "v1.30.0"  # the oldest Kubernetes the chart supports (Chart.yaml kubeVersion)


class RenderError(RuntimeError):
    """The chart did not render (bad values, a template error) or did not lint."""


def _helm() -> Any:
    try:
        import helm_python
    except ImportError as exc:  # a dev dependency (pyproject [dev])
        raise RenderError("helm-python-sdk is not installed: pip install -e '.[dev]'") from exc
    return helm_python


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of -f files: maps merge key by key, everything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_values(paths: list[Path]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for path in paths:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise RenderError(f"{path}: a values file must be a mapping")
        values = merge(values, loaded)
    return values


def render(values: dict[str, Any] | None = None, *, release: str = "kunserve", namespace: str = "kunserve-system",
           chart: Path = CHART, include_crds: bool = False) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included); CRDs first when include_crds."""
    helm = _helm()
    try:
        with helm.Chart.load(str(chart)) as loaded:
            out: dict[str, str] = {}
            if include_crds:
                for crd in loaded.crds:
                    out[f"{loaded.name}/crds/{crd['filename'].rsplit('/', 1)[-1]}"] = crd["data"]
            out.update(loaded.render(values or {}, name=release, namespace=namespace, is_install=True))
            return out
    except helm.HelmError as exc:
        raise RenderError(str(exc)) from exc


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every non-empty YAML document of the rendered templates (NOTES.txt left out), in template order."""
    docs: list[dict[str, Any]] = []
    for name in sorted(rendered):
        if name.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(rendered[name]):
            if doc:
                docs.append(doc)
    return docs


def to_yaml(rendered: dict[str, str]) -> str:
    parts = []
    for name in sorted(rendered, key=lambda n: ("/crds/" not in n, n)):
        body = rendered[name].strip()
        if name.endswith("NOTES.txt") or not body or all(not d for d in yaml.safe_load_all(body)):
            continue
        parts.append(f"---\n# Source: {name}\n{body}\n")
    return "".join(parts)


def lint(values: dict[str, Any] | None = None, chart: Path = CHART, namespace: str = "kunserve-system",
         kube_version: str = KUBE_VERSION) -> list[str]:
    """`helm lint --strict`: the problems found (warnings count; the 'icon is recommended' info does not)."""
    report = _helm().lint(str(chart), values or {}, strict=True, namespace=namespace, kube_version=kube_version)
    problems = [f"{m['path']}: {m['error'].strip()}" for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    return problems + [str(e).strip() for e in report.get("errors", []) if str(e).strip() not in
                       {p.split(": ", 1)[-1] for p in problems}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Render the KunServe chart with Helm's engine (no helm binary).")
    p.add_argument("-f", "--values", type=Path, action="append", default=[], help="values file (repeatable)")
    p.add_argument("-n", "--namespace", default="kunserve-system", help="release namespace")
    p.add_argument("--release", default="kunserve", help="release name")
    p.add_argument("--chart", type=Path, default=CHART)
    p.add_argument("--include-crds", action="store_true", help="put crds/ first, as helm install applies them")
    p.add_argument("--out", type=Path, default=None, help="write one file per template here instead of stdout")
    p.add_argument("--notes", action="store_true", help="print NOTES.txt (to stderr)")
    p.add_argument("--lint", action="store_true", help="lint the chart with these values instead of rendering")
    args = p.parse_args(argv)
    try:
        values = load_values(args.values)
        if args.lint:
            problems = lint(values, args.chart, args.namespace)
            for problem in problems:
                print(problem, file=sys.stderr)
            print(f"lint: {len(problems)} problem(s)", file=sys.stderr)
            return 1 if problems else 0
        rendered = render(values, release=args.release, namespace=args.namespace, chart=args.chart,
                          include_crds=args.include_crds)
    except (RenderError, OSError, yaml.YAMLError) as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 1
    if args.notes:
        notes = next((text for name, text in rendered.items() if name.endswith("NOTES.txt")), "")
        print(notes, file=sys.stderr)
    if args.out is None:
        sys.stdout.write(to_yaml(rendered))
        return 0
    for name, text in rendered.items():
        if name.endswith("NOTES.txt") or not text.strip():
            continue
        path = args.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    print(f"rendered into {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
