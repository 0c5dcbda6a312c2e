"""What must hold after hours of chaos, checked at the end (and epochs continuously): the invariant report.

- requests: no attempt failed other than with a retryable 503 / 429 the client saw; every finished request
  carried exactly one finish reason and exactly the reference tokens (greedy and seeded: the engine
  in-process on the same prompt ids); a client that hung up got a prefix of them; every journal entry left expires and
  the gateway has nothing in flight;
- agents: role replica, every layer, nothing prepared, free == total KV blocks once idle;
- epochs: the topology's never went back; each agent process's never went back; no agent is ahead of the
  topology at the end; no reconfiguration record is left unfinished;
- topology in Redis == what the agents report (no group left, every replica an agent serving alone);
- resident memory: the slope of VmRSS after warm-up, per process (MiB per minute, least squares).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.soak.cluster import POOL, Cluster
from bench.soak.workload import Outcome, Status, Template
from kunserve.operator.local_controller import records_key
from kunserve.operator.topology_writer import topology_key
from kunserve.rpc.v1 import agent_pb2, agent_pb2_grpc


def agent_status(endpoint: str, timeout: float = 3.0) -> agent_pb2.StatusResponse:
    with grpc.insecure_channel(endpoint) as ch:
        return agent_pb2_grpc.AgentStub(ch).Status(agent_pb2.StatusRequest(), timeout=timeout)


def reference_tokens(model: Path, templates: list[Template], prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    """Each template's tokens from the engine in this process (no gateway, no agent, no chaos)."""
    from kunserve.agent.engine.config import EngineConfig
    from kunserve.agent.engine.llm_engine import LLMEngine
    from kunserve.agent.engine.sequence import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(model), device="cpu", num_kv_blocks=512, torch_threads=1,
                                    progress=False))
    out = {}
    for t in templates:
        params = SamplingParams(max_tokens=t.max_tokens, temperature=t.temperature, top_p=t.top_p, seed=t.seed,
                                ignore_eos=True)
        out[t.key] = engine.generate([prompts[t.key]], params)[0].token_ids
    return out


def slope_mib_per_min(samples: list[tuple[float, int]]) -> float | None:
    """Least-squares slope of (unix s, KiB) samples in MiB per minute; None with fewer than 5 samples."""
    if len(samples) < 5:
        return None
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    den = sum((t - mt) ** 2 for t, _ in samples)
    if den == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in samples) / den * 60 / 1024


@dataclass(slots=True)
class EpochMonitor:
    """Every interval: the topology's epoch and every agent process's epoch, each must never go back."""

    cluster: Cluster
    interval_s: float = 2.0
    violations: list[str] = field(default_factory=list)
    topology_epochs: list[int] = field(default_factory=list)
    agent_epochs: dict[tuple[str, int], int] = field(default_factory=dict)  # (agent, incarnation) -> epoch
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="epochs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def sample(self) -> None:
        try:
            r = self.cluster.redis_client()
            raw = r.get(topology_key(POOL))
            r.close()
            if isinstance(raw, str):
                epoch = int(json.loads(raw)["epoch"])
                if self.topology_epochs and epoch < self.topology_epochs[-1]:
                    self.violations.append(f"topology epoch went back: {self.topology_epochs[-1]} -> {epoch}")
                self.topology_epochs.append(epoch)
        except Exception:
            pass  # Redis restarting
        for agent, endpoint in self.cluster.endpoints.items():
            pod = self.cluster.pods[agent]
            # The process is told apart by its incarnation (how many times the supervisor started it; a pid
            # alone may be reused by the OS). A pod being restarted is skipped: its new process answers
            # before the supervisor's start returns (and counts it). A restart during the call leaves unknown
            # which process answered.
            incarnation = pod.incarnation
            if not pod.alive():
                continue
            try:
                st = agent_status(endpoint)
            except grpc.RpcError:
                continue
            if pod.incarnation != incarnation:
                continue
            pid = pod.pids[-1] if pod.pids else 0
            last = self.agent_epochs.get((agent, incarnation))
            if last is not None and st.epoch < last:
                self.violations.append(f"{agent} (pid {pid}) epoch went back: {last} -> {st.epoch}")
            self.agent_epochs[(agent, incarnation)] = int(st.epoch)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()


@dataclass(slots=True)
class Report:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append((name, ok, detail))

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def text(self) -> str:
        lines = ["invariant report", "-" * 16]
        for name, ok, detail in self.checks:
            lines.append(f"[{'PASS' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""))
        for k, v in self.facts.items():
            lines.append(f"  {k}: {v}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [{"name": n, "ok": o, "detail": d} for n, o, d in self.checks],
                "facts": self.facts}


def check_requests(report: Report, outcomes: list[Outcome], reference: dict[str, list[int]]) -> None:
    by = {s: [o for o in outcomes if o.status is s] for s in Status}
    report.facts["attempts"] = {s.value: len(v) for s, v in by.items()}
    report.facts["retryable errors seen"] = sorted({o.error.split(":")[0] for o in by[Status.RETRYABLE]})
    fatal = by[Status.FATAL]
    report.check("no attempt failed except retryably (503/429)", not fatal,
                 "; ".join(f"{o.key} stream={o.stream}: {o.error}" for o in fatal[:5]))
    wrong = [o for o in by[Status.OK] if o.tokens != reference[o.key] or o.finishes != 1]
    report.check("finished requests: one finish reason, tokens == reference", not wrong,
                 "; ".join(f"{o.key} stream={o.stream} finishes={o.finishes} got {o.tokens[:8]}.. want "
                           f"{reference[o.key][:8]}.." for o in wrong[:5]))
    cut = [o for o in by[Status.DISCONNECTED] if o.tokens != reference[o.key][:len(o.tokens)]]
    report.check("hung-up streams: a prefix of the reference", not cut, "; ".join(o.key for o in cut[:5]))


def check_serving_state(report: Report, cluster: Cluster, timeout_s: float = 60.0) -> None:
    r = cluster.redis_client()
    deadline = time.monotonic() + timeout_s
    while True:  # the agents' pools drain shortly after the last request
        statuses = {a: agent_status(e) for a, e in cluster.endpoints.items()}
        if all(s.kv_blocks_free == s.kv_blocks_total for s in statuses.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # A finished request's entry stays when its delete failed during a Redis outage (the gateway does not retry
    # it): it must at least expire. An entry without an expiry would be kept forever.
    journal = list(r.scan_iter(match=f"kunserve:journal:{POOL}:*", count=500))
    ttls = [int(r.ttl(k)) for k in journal]
    report.check("journal: every entry left expires (TTL set)", all(t > 0 for t in ttls), f"TTLs {ttls}")
    report.facts["journal entries left (finished, delete lost in a Redis outage)"] = (
        f"{len(journal)}, expiring within {max(ttls, default=0)} s")
    with urllib.request.urlopen(cluster.gateway_url + "/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    in_flight = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith("kunserve_gateway_requests_in_flight"))
    report.check("gateway: nothing in flight", in_flight == 0, f"{in_flight:g}")
    bad = {a: (agent_pb2.Role.Name(s.role), s.layer_start, s.layer_end, s.prepared_epoch, s.kv_blocks_free,
               s.kv_blocks_total) for a, s in statuses.items()
           if (s.role, s.layer_start, s.layer_end, s.prepared_epoch) != (agent_pb2.ROLE_REPLICA, 0, s.num_layers, 0)
           or s.kv_blocks_free != s.kv_blocks_total}
    report.check("agents: replica, every layer, nothing prepared, free == total blocks", not bad, str(bad))
    topo = json.loads(r.get(topology_key(POOL)) or "{}")
    epoch = int(topo.get("epoch") or 0)
    ahead = {a: int(s.epoch) for a, s in statuses.items() if s.epoch > epoch}
    report.check("no agent ahead of the topology's epoch", not ahead, f"topology {epoch}, agents {ahead}")
    mismatch = [e["id"] for e in topo.get("replicas", []) if e.get("group") is not None
                or e.get("endpoint") != cluster.endpoints.get(e["id"])]
    report.check("topology in Redis == agents (no group, every endpoint)",
                 not mismatch and not topo.get("groups") and {e["id"] for e in topo.get("replicas", [])}
                 == set(cluster.endpoints), f"groups {topo.get('groups')}, mismatched {mismatch}")
    records = {k: json.loads(v) for k, v in r.hgetall(records_key(POOL)).items()}
    phases: dict[str, int] = {}
    for doc in records.values():
        phase = (doc.get("status") or {}).get("phase", "?")
        phases[phase] = phases.get(phase, 0) + 1
    report.facts["reconfiguration records"] = phases
    unfinished = [str(k) for k, d in records.items() if (d.get("status") or {}).get("phase") in ("Pending", "Preparing",
                                                                                           "Committed")]
    report.check("no reconfiguration record left unfinished", not unfinished, ", ".join(unfinished))
    report.facts["groups reconciled by the harness (operator gap)"] = int(r.get(f"soak:{POOL}:reconciled") or 0)
    r.close()


def check_memory(report: Report, cluster: Cluster, after: float, limit_mib_per_min: float) -> None:
    slopes: dict[str, str] = {}
    worst = 0.0
    for pod in cluster.pods.values():
        # The process that ran longest after warm-up (one incarnation: a restarted one starts small again).
        run = max(range(1, pod.incarnation + 1), key=lambda i: sum(1 for s in pod.rss if s[1] == i and s[0] >= after),
                  default=0)
        pid = pod.pids[run - 1] if run else 0
        samples = [(t, kib) for t, i, kib in pod.rss if i == run and t >= after]
        slope = slope_mib_per_min(samples)
        if slope is None:
            slopes[pod.name] = "too few samples"
            continue
        span = (samples[-1][0] - samples[0][0]) / 60
        slopes[pod.name] = (f"{slope:+.2f} MiB/min over {span:.1f} min (pid {pid}, {samples[0][1] / 1024:.0f} -> "
                            f"{samples[-1][1] / 1024:.0f} MiB)")
        if pod.kind != "redis":  # redis holds the growing record history by design
            worst = max(worst, slope)
    report.facts["VmRSS slope after warm-up"] = slopes
    report.check(f"resident memory flat after warm-up (slope < {limit_mib_per_min:g} MiB/min)",
                 worst < limit_mib_per_min, f"worst {worst:+.2f} MiB/min")
