"""The autoscaler's state in a ServingPool's status.autoscaling, both ways (pure), and its Prometheus series.

The status is the durable half of `autoscale.ScaleState` (replica count, the scale-out in flight, drains, the
groups a bridge released), so an operator restart resumes it; the recommendation history of the
stabilisation windows is kept in memory only (a restart starts the windows again, which only delays a
scale-in).
"""

from __future__ import annotations

import contextlib
import datetime
import math
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from kunserve.operator.autoscale import ScaleDecision, ScaleState, ScaleUp
from kunserve.operator.pool_signals import PoolSignals
from kunserve.operator.pool_spec import ServingPool, workload_replicas


def _int(raw: Any) -> int | None:
    return raw if isinstance(raw, int) and not isinstance(raw, bool) else None


def _num(raw: Any) -> float | None:
    return float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else None


def state_from_status(pool: ServingPool, status: Mapping[str, Any] | None,
                      history: Sequence[tuple[float, int]] = ()) -> ScaleState:
    raw = (status or {}).get("autoscaling") or {}
    replicas = workload_replicas(pool, status)
    start, since = _int(raw.get("scaleUpFrom")), _num(raw.get("scaleUpSince"))
    scale_up = None
    if start is not None and since is not None and start < replicas:
        scale_up = ScaleUp(start=start, target=replicas, since=since, bridge=bool(raw.get("bridge")))
    names = [str(n) for n in raw.get("draining") or []]
    times = [_num(t) or 0.0 for t in raw.get("drainingSince") or []]
    draining = tuple(zip(names, times + [0.0] * (len(names) - len(times)), strict=True))
    release = tuple(str(g) for g in raw.get("release") or [])
    return ScaleState(replicas=replicas, scale_up=scale_up, draining=draining, release=release,
                      history=tuple(history))


def status_of(decision: ScaleDecision, previous: Mapping[str, Any] | None, now: datetime.datetime) -> dict[str, Any]:
    """status.autoscaling for this decision (lastScaleTime moves only when the replica count does)."""
    st, prev = decision.state, previous or {}
    moved = prev.get("replicas") != st.replicas
    out: dict[str, Any] = {
        "replicas": st.replicas,
        "desiredReplicas": decision.signals.desired_replicas,
        "scaleUpFrom": st.scale_up.start if st.scale_up else None,
        "scaleUpSince": round(st.scale_up.since, 3) if st.scale_up else None,
        "bridge": st.scale_up.bridge if st.scale_up else None,
        "release": list(st.release) or None,
        "draining": list(st.draining_names) or None,
        "drainingSince": [round(t, 3) for _, t in st.draining] or None,
        **decision.signals.to_status(),
        "lastScaleTime": now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if moved
        else prev.get("lastScaleTime"),
        "message": decision.reason or prev.get("message"),
    }
    if out["demand"] is not None:
        out["demand"] = round(out["demand"], 2)
    return out


def without_nulls(raw: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (raw or {}).items() if v is not None}


class PoolMetrics:
    """Per-pool series an autoscaler can trust (labels namespace, pool); one registry per process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ("namespace", "pool")

        def gauge(name: str, text: str) -> Gauge:
            return Gauge(name, text, labels, registry=self.registry)

        self.demand = gauge("kunserve_pool_kv_demand_ratio",
                            "KV blocks needed / KV blocks of the ready replicas with every layer (no drop)")
        self.needed = gauge("kunserve_pool_kv_blocks_needed", "KV blocks the running and waiting requests need")
        self.full = gauge("kunserve_pool_kv_blocks_full_capacity",
                          "KV blocks the ready replicas hold with every layer (what they return to on restore)")
        self.total = gauge("kunserve_pool_kv_blocks_current", "KV blocks the ready replicas hold now (grown by drops)")
        self.dropped = gauge("kunserve_pool_replicas_dropped", "Replicas serving in a cooperative group")
        self.replicas = gauge("kunserve_pool_replicas", "Replicas the workload has (pods / agent processes)")
        self.ready = gauge("kunserve_pool_ready_replicas", "Replicas reporting pressure (weights loaded, serving)")
        self.desired = gauge("kunserve_pool_desired_replicas", "Replicas the autoscaler recommends (stabilised)")
        self.waiting = gauge("kunserve_pool_requests_waiting", "Requests waiting on the pool's replicas")
        self.events = Counter("kunserve_pool_scale_events", "Autoscaling decisions by kind",
                              (*labels, "event"), registry=self.registry)

    def observe(self, namespace: str, pool: str, signals: PoolSignals, event: str | None = None) -> None:
        values = {self.needed: signals.blocks_needed, self.full: signals.blocks_full, self.total: signals.blocks_total,
                  self.dropped: signals.replicas_dropped, self.replicas: signals.replicas,
                  self.ready: signals.ready_replicas, self.desired: signals.desired_replicas,
                  self.waiting: signals.num_waiting}
        for g, v in values.items():
            g.labels(namespace, pool).set(v)
        demand = signals.demand
        self.demand.labels(namespace, pool).set(demand if math.isfinite(demand) else float("nan"))
        if event is not None:
            self.events.labels(namespace, pool, event).inc()

    def forget(self, namespace: str, pool: str) -> None:
        for g in (self.demand, self.needed, self.full, self.total, self.dropped, self.replicas, self.ready,
                  self.desired, self.waiting):
            with contextlib.suppress(KeyError):
                g.remove(namespace, pool)
