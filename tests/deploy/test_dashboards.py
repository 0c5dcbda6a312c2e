"""The Grafana dashboards of the chart: generated (not hand-edited), parameterised by a datasource variable,
using only metric names the agents and gateways export (or the drop/restore series named in PENDING), and
shipped as ConfigMaps the Grafana sidecar picks up."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest

from kunserve.agent import metrics as agent_metrics
from kunserve.gateway import metrics as gateway_metrics
from tests.deploy.helm_tools import CHART, REPO, VALUES_ALL, by_kind, load_script, render_docs, values_file

DASHBOARDS = CHART / "dashboards"
# Series of the drop/restore work that the agents do not export yet: name -> type. Once an agent exports
# one, it must be with this type (the dashboards depend on the suffixes a type produces).
PENDING: dict[str, str] = {}
_CONSTRUCTORS = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram", "gauge": "gauge",
                 "CounterMetricFamily": "counter", "GaugeMetricFamily": "gauge", "HistogramMetricFamily": "histogram"}
_METRIC = re.compile(r"\b((?:vllm:|kunserve_)[a-zA-Z0-9_:]+)")


def declared_metrics(*modules: Any) -> dict[str, str]:
    """name -> type of every metric the modules create (Counter/Gauge/Histogram, the *MetricFamily of custom
    collectors, or the agent's `gauge(...)` helper), read from their source."""
    found: dict[str, str] = {}
    for module in modules:
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            first = node.args[0]
            if func in _CONSTRUCTORS and isinstance(first, ast.Constant) and isinstance(first.value, str):
                found[first.value] = _CONSTRUCTORS[func]
    return found


def exposed(name: str, kind: str) -> set[str]:
    """The series names prometheus_client exposes for a metric."""
    if kind == "counter":
        base = name.removesuffix("_total")
        return {f"{base}_total", f"{base}_created"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_count", f"{name}_sum", f"{name}_created"}
    return {name}


def exprs(node: Any) -> list[str]:
    """Every PromQL expression in a dashboard (panel targets, annotations, variable queries)."""
    out: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                out.append(value)
            else:
                out.extend(exprs(value))
    elif isinstance(node, list):
        for item in node:
            out.extend(exprs(item))
    return out


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DASHBOARDS / name).read_text(encoding="utf-8"))
    return data


def test_committed_dashboards_are_the_generators_output(tmp_path: Path) -> None:
    gen = load_script(REPO / "deploy" / "helm" / "dashboards_gen.py")
    assert gen.main(["--check"]) == 0, "run: python deploy/helm/dashboards_gen.py"
    assert gen.main(["--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in DASHBOARDS.glob("*.json"))
    (tmp_path / "kunserve-serving.json").write_text("{}")
    assert gen.main(["--check", "--out", str(tmp_path)]) == 1  # the check can fail


def test_every_metric_in_the_dashboards_is_exported() -> None:
    declared = declared_metrics(agent_metrics, gateway_metrics)
    assert {"vllm:time_to_first_token_seconds", "kunserve_kv_blocks_total", "kunserve_gateway_replays_total"} <= set(
        declared)  # the scan itself works
    for name, kind in PENDING.items():
        if name in declared:
            assert declared[name] == kind, f"{name} is exported as a {declared[name]}, the dashboards expect a {kind}"
    known: set[str] = set()
    for name, kind in {**PENDING, **declared}.items():
        known |= exposed(name, kind)
    for path in sorted(DASHBOARDS.glob("*.json")):
        used = {m for e in exprs(load(path.name)) for m in _METRIC.findall(e)}
        assert used, path.name
        assert used <= known, f"{path.name} uses series nothing exports: {sorted(used - known)}"


def test_dashboards_cover_what_an_operator_watches() -> None:
    titles = " | ".join(p["title"] for path in DASHBOARDS.glob("*.json") for p in load(path.name)["panels"])
    for wanted in ("TTFT", "TPOT", "End-to-end", "queue length", "KV usage", "KV blocks per agent", "Layers held",
                   "Layers dropped", "Group membership", "Topology epoch", "Drops and restores", "Drop latency",
                   "Restore duration", "Remote attention", "KV exchange", "replays", "Errors"):
        assert wanted.lower() in titles.lower(), wanted
    used = " ".join(e for path in DASHBOARDS.glob("*.json") for e in exprs(load(path.name)))
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket" in used


@pytest.mark.parametrize("name", ["kunserve-serving.json", "kunserve-elasticity.json"])
def test_the_datasource_is_a_template_variable(name: str) -> None:
    dashboard = load(name)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "pool", "pod"} <= set(variables)
    text = json.dumps(dashboard)
    assert '"uid": "${datasource}"' in text
    uids = re.findall(r'"datasource": \{"type": "(\w+)", "uid": "([^"]+)"\}', text)
    assert uids and all(uid in ("${datasource}", "-- Grafana --") for _t, uid in uids), set(uids)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        for t in panel.get("targets", []):
            assert '$namespace' in t["expr"] and '$pool' in t["expr"], t["expr"]


def test_dashboards_ship_as_configmaps_for_the_grafana_sidecar() -> None:
    docs = render_docs(values_file(VALUES_ALL))
    maps = [d for d in by_kind(docs, "ConfigMap") if "-dashboard-" in d["metadata"]["name"]]
    assert sorted(m["metadata"]["name"] for m in maps) == ["ks-dashboard-kunserve-elasticity",
                                                           "ks-dashboard-kunserve-serving"]
    for cm in maps:
        assert cm["metadata"]["namespace"] == "monitoring"
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM"}
        ((file_name, body),) = cm["data"].items()
        assert json.loads(body) == load(file_name)
    assert not [d for d in render_docs({"dashboards": {"enabled": False}}) if d["kind"] == "ConfigMap"]
