"""Generates the Grafana dashboards of the Helm chart (deploy/helm/kunserve/dashboards/*.json).

    python deploy/helm/dashboards_gen.py            # (re)write the JSON files
    python deploy/helm/dashboards_gen.py --check    # exit 1 when the committed files differ from the output

The chart ships them as ConfigMaps for Grafana's dashboard sidecar (templates/configmap-dashboards.yaml).
Every query uses the datasource template variable `$datasource`, and the labels the chart's ServiceMonitors
produce: `namespace`, `pod` (Prometheus Operator's defaults) and `pool` (relabelled from the Service label
`kunserve.io/pool`). Metric names are the ones the agents and gateways export (agent/kunserve/agent/metrics.py,
gateway/kunserve/gateway/metrics.py); tests/deploy/test_dashboards.py checks every name used here against them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "kunserve" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
AGENTS = 'namespace=~"$namespace", pool=~"$pool", pod=~"$pod"'
GATEWAYS = 'namespace=~"$namespace", pool=~"$pool"'
QUANTILES = (0.5, 0.95, 0.99)

Json = dict[str, Any]


def target(expr: str, legend: str, ref: str) -> Json:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def quantiles(histogram: str, selector: str, by: str = "") -> list[tuple[str, str]]:
    """p50/p95/p99 of a Prometheus histogram (optionally per label)."""
    group = f"le, {by}" if by else "le"
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({histogram}_bucket{{{selector}}}[$__rate_interval])))",
             f"p{int(q * 100)}" + (f" {{{{{by}}}}}" if by else "")) for q in QUANTILES]


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    panels: list[Json] = field(default_factory=list)
    annotations: list[Json] = field(default_factory=list)
    _y: int = 0
    _x: int = 0
    _row_height: int = 0
    _next_id: int = 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "collapsed": False, "id": self._id(),
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y}, "panels": []})
        self._y += 1

    def _newline(self) -> None:
        if self._x:
            self._y += self._row_height
            self._x, self._row_height = 0, 0

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _place(self, width: int, height: int) -> Json:
        if self._x + width > 24:
            self._newline()
        pos = {"h": height, "w": width, "x": self._x, "y": self._y}
        self._x += width
        self._row_height = max(self._row_height, height)
        return pos

    def timeseries(self, title: str, description: str, queries: list[tuple[str, str]], unit: str,
                   width: int = 8, height: int = 8, stack: bool = False, min_zero: bool = True) -> None:
        custom: Json = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                        "spanNulls": False}
        if stack:
            custom["stacking"] = {"mode": "normal", "group": "A"}
        defaults: Json = {"unit": unit, "custom": custom}
        if min_zero:
            defaults["min"] = 0
        self.panels.append({
            "type": "timeseries", "title": title, "description": description, "id": self._id(),
            "datasource": DATASOURCE, "gridPos": self._place(width, height),
            "targets": [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)],
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
        })

    def state_timeline(self, title: str, description: str, expr: str, legend: str, width: int = 12,
                       height: int = 8) -> None:
        self.panels.append({
            "type": "state-timeline", "title": title, "description": description, "id": self._id(),
            "datasource": DATASOURCE, "gridPos": self._place(width, height),
            "targets": [target(expr, legend, "A")],
            "fieldConfig": {"defaults": {"custom": {"fillOpacity": 80, "lineWidth": 0}, "color": {
                "mode": "palette-classic"}}, "overrides": []},
            "options": {"showValue": "never", "mergeValues": True, "rowHeight": 0.9,
                        "legend": {"displayMode": "list", "placement": "bottom"}},
        })

    def annotation(self, name: str, expr: str, title: str, text: str, color: str) -> None:
        self.annotations.append({
            "name": name, "datasource": DATASOURCE, "enable": True, "iconColor": color, "expr": expr,
            "step": "30s", "titleFormat": title, "textFormat": text, "useValueForTime": False,
        })

    def render(self) -> Json:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["kunserve", "llm"],
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": 39,
            "version": 1,
            "refresh": "30s",
            "time": {"from": "now-1h", "to": "now"},
            "timepicker": {},
            "fiscalYearStartMonth": 0,
            "liveNow": False,
            "weekStart": "",
            "links": [{"type": "dashboards", "tags": ["kunserve"], "asDropdown": True, "title": "KunServe",
                       "includeVars": True, "keepTime": True}],
            "templating": {"list": templating()},
            "annotations": {"list": [{
                "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
                "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
                "type": "dashboard"}, *self.annotations]},
            "panels": self.panels,
        }


def _query_variable(name: str, label: str, query: str, multi: bool = True) -> Json:
    return {
        "name": name, "label": label, "type": "query", "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-query"}, "definition": query,
        "refresh": 2, "sort": 1, "multi": multi, "includeAll": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [], "hide": 0,
    }


def templating() -> list[Json]:
    return [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
        _query_variable("namespace", "Namespace", "label_values(kunserve_kv_blocks_total, namespace)"),
        _query_variable("pool", "Pool", 'label_values(kunserve_kv_blocks_total{namespace=~"$namespace"}, pool)'),
        _query_variable("pod", "Agent",
                        'label_values(kunserve_kv_blocks_total{namespace=~"$namespace", pool=~"$pool"}, pod)'),
    ]


def epoch_annotation(d: Dashboard) -> None:
    d.annotation("Reconfigurations", f"changes(max by (pool) (kunserve_group_epoch{{{GATEWAYS}}})[2m:30s]) > 0",
                 "epoch changed", "pool {{pool}}: new topology epoch (drop or restore committed)", "orange")


def serving() -> Dashboard:
    d = Dashboard("kunserve-serving", "KunServe / Serving",
                  "Latency, queues and KV cache of the agents; requests, replays and errors of the gateways.")
    epoch_annotation(d)
    d.row("Latency (agents)")
    d.timeseries("Time to first token (TTFT)", "Arrival to first token, across the selected agents.",
                 quantiles("vllm:time_to_first_token_seconds", AGENTS), "s")
    d.timeseries("Time per output token (TPOT)", "Time between two output tokens of a request.",
                 quantiles("vllm:inter_token_latency_seconds", AGENTS), "s")
    d.timeseries("End-to-end request latency", "Arrival to last token.",
                 quantiles("vllm:e2e_request_latency_seconds", AGENTS), "s")
    d.row("Load and queues")
    d.timeseries("Waiting requests (queue length) per agent", "Requests queued for admission (KV blocks full).",
                 [(f"sum by (pod) (vllm:num_requests_waiting{{{AGENTS}}})", "{{pod}}")], "short")
    d.timeseries("Running requests per agent", "Requests in the running batch.",
                 [(f"sum by (pod) (vllm:num_requests_running{{{AGENTS}}})", "{{pod}}")], "short")
    d.timeseries("Throughput", "Finished requests and generated tokens per second, all selected agents.",
                 [(f"sum(rate(vllm:request_success_total{{{AGENTS}}}[$__rate_interval]))", "requests/s"),
                  (f"sum(rate(vllm:generation_tokens_total{{{AGENTS}}}[$__rate_interval]))", "tokens/s")], "short")
    d.row("KV cache")
    d.timeseries("KV usage per agent", "Fraction of the agent's KV blocks in use (1 = full).",
                 [(f"max by (pod) (vllm:kv_cache_usage_perc{{{AGENTS}}})", "{{pod}}")], "percentunit")
    d.timeseries("KV blocks per agent (raw)",
                 "Blocks in the pool (grows when layers are dropped, shrinks on restore) and blocks free. "
                 "Raw counts: a grown pool is not a fall in load.",
                 [(f"max by (pod) (kunserve_kv_blocks_total{{{AGENTS}}})", "total {{pod}}"),
                  (f"max by (pod) (kunserve_kv_blocks_free{{{AGENTS}}})", "free {{pod}}")], "short")
    d.timeseries("Preemptions", "Requests preempted (recomputed) per second, per agent.",
                 [(f"sum by (pod) (rate(vllm:num_preemptions_total{{{AGENTS}}}[$__rate_interval]))", "{{pod}}")],
                 "short")
    d.row("Gateways")
    d.timeseries("Requests by status", "HTTP requests per second by route and status code.",
                 [(f"sum by (route, status) (rate(kunserve_gateway_requests_total{{{GATEWAYS}}}[$__rate_interval]))",
                   "{{route}} {{status}}")], "reqps", stack=True)
    d.timeseries("Gateway TTFT", "Accepting a request to its first token leaving the gateway.",
                 quantiles("kunserve_gateway_time_to_first_token_seconds", GATEWAYS), "s")
    d.timeseries("Gateway request duration", "Accepting a generation request to its end.",
                 quantiles("kunserve_gateway_request_duration_seconds", GATEWAYS), "s")
    d.timeseries("Token replays", "Requests re-submitted to another agent after a broken stream, by reason.",
                 [(f"sum by (reason) (rate(kunserve_gateway_replays_total{{{GATEWAYS}}}[$__rate_interval]))",
                   "{{reason}}")], "reqps")
    d.timeseries("Errors", "5xx answers, streams that ended in an error event, and 503s for want of a replica.",
                 [(f'sum by (status) (rate(kunserve_gateway_requests_total{{{GATEWAYS}, status=~"5.."}}'
                   "[$__rate_interval]))", "HTTP {{status}}"),
                  (f"sum by (code) (rate(kunserve_gateway_stream_errors_total{{{GATEWAYS}}}[$__rate_interval]))",
                   "stream error {{code}}"),
                  (f"sum(rate(kunserve_gateway_no_replica_total{{{GATEWAYS}}}[$__rate_interval]))",
                   "no replica (503)")], "reqps")
    d.timeseries("In flight and routable replicas", "Accepted, unfinished requests; replicas a gateway can route to.",
                 [(f"sum by (pool) (kunserve_gateway_requests_in_flight{{{GATEWAYS}}})", "in flight {{pool}}"),
                  (f"min by (pool) (kunserve_gateway_replicas_available{{{GATEWAYS}}})", "replicas {{pool}}")],
                 "short")
    return d


def elasticity() -> Dashboard:
    d = Dashboard("kunserve-elasticity", "KunServe / Elasticity",
                  "Drops and restores: layers per agent, groups and epochs, remote attention and KV exchange.")
    epoch_annotation(d)
    d.row("Layers and groups")
    d.timeseries("Layers held per agent", "Decoder layers each agent holds (all of them when serving alone).",
                 [(f"max by (pod) (kunserve_layers_held{{{AGENTS}}})", "{{pod}}")], "short", width=12)
    d.timeseries("Layers dropped per agent", "Decoder layers an agent gave up to KV blocks.",
                 [(f"max by (pod) (kunserve_layers_dropped{{{AGENTS}}})", "{{pod}}")], "short", width=12)
    d.state_timeline("Group membership (role per agent)", "The role each agent plays: its kunserve_group_role "
                     "series with value 1.",
                     f"max by (pod, role) (kunserve_group_role{{{AGENTS}}}) == 1", "{{pod}} {{role}}")
    d.timeseries("Topology epoch", "Epoch each agent committed last, and the epoch the gateways route by.",
                 [(f"max by (pod) (kunserve_group_epoch{{{AGENTS}}})", "{{pod}}"),
                  (f"max by (pool) (kunserve_gateway_topology_epoch{{{GATEWAYS}}})", "gateways {{pool}}")],
                 "short", width=12)
    d.row("Reconfigurations")
    d.timeseries("Drops and restores", "Drops and restores completed per agent in each interval.",
                 [(f"sum by (pod) (increase(kunserve_drop_latency_seconds_count{{{AGENTS}}}[$__rate_interval]))",
                   "drop {{pod}}"),
                  (f"sum by (pod) (increase(kunserve_restore_duration_seconds_count{{{AGENTS}}}"
                   "[$__rate_interval]))", "restore {{pod}}")], "short")
    d.timeseries("Drop latency", "Prepare to pool grown, per drop.",
                 quantiles("kunserve_drop_latency_seconds", AGENTS), "s")
    d.timeseries("Restore duration", "Reload of the dropped layers and KV moved back, per restore.",
                 quantiles("kunserve_restore_duration_seconds", AGENTS), "s")
    d.row("Cooperative execution")
    d.timeseries("Remote attention calls", "Attention on another agent's KV, calls per second: made by a stage "
                 "that holds the layer, served by the agent that holds the request's KV.",
                 [(f"sum by (pod, side) (rate(kunserve_remote_attention_calls_total{{{AGENTS}}}[$__rate_interval]))",
                   "{{pod}} {{side}}")], "ops", width=12)
    d.timeseries("KV exchange throughput", "KV bytes an agent receives per second (live exchange, restore).",
                 [(f"sum by (pod) (rate(kunserve_kv_exchange_bytes_total{{{AGENTS}}}[$__rate_interval]))",
                   "{{pod}}")], "Bps", width=12)
    d.timeseries("KV blocks total vs. free (pool)", "Raw blocks of the selected agents: capacity from dropped "
                 "layers appears as a step in total.",
                 [(f"sum by (pool) (kunserve_kv_blocks_total{{{AGENTS}}})", "total {{pool}}"),
                  (f"sum by (pool) (kunserve_kv_blocks_free{{{AGENTS}}})", "free {{pool}}")], "short", width=12)
    d.timeseries("Waiting requests (pool)", "Queued requests of the pool: what a drop is meant to clear.",
                 [(f"sum by (pool) (vllm:num_requests_waiting{{{AGENTS}}})", "{{pool}}")], "short", width=12)
    return d


def dashboards() -> dict[str, Json]:
    """File name -> dashboard JSON."""
    return {f"{d.uid}.json": d.render() for d in (serving(), elasticity())}


def dumps(dashboard: Json) -> str:
    return json.dumps(dashboard, indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="fail when the committed dashboards are stale")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    stale = []
    for name, dashboard in dashboards().items():
        path: Path = args.out / name
        text = dumps(dashboard)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if stale:
        print("stale dashboards (run python deploy/helm/dashboards_gen.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
