"""Prometheus metrics of an agent: the vLLM names that GIE / llm-d / KEDA consume, plus kunserve_* series.

Gauges read the engine's state at scrape time (plain counters and list lengths, safe to read from the
HTTP thread); histograms and counters are fed from the engine thread as outputs are produced.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kunserve.agent.engine.llm_engine import LLMEngine
from kunserve.agent.engine.output import RequestOutput

if TYPE_CHECKING:
    from kunserve.agent.member import Member
    from kunserve.agent.member_base import MemberBase

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)


class AgentMetrics:
    def __init__(self, engine: LLMEngine, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, labels = self.registry, {"model_name": model_name}
        self.engine = engine
        # The scheduler and pool are replaced when a group forms or splits: read them through the engine.

        class _Live:
            @property
            def running(self) -> list[object]:
                return engine.scheduler.running  # type: ignore[return-value]

            @property
            def waiting(self) -> list[object]:
                return list(engine.scheduler.waiting)

            @property
            def num_preemptions(self) -> int:
                return engine.scheduler.num_preemptions

        class _Pool:
            @property
            def num_blocks(self) -> int:
                return engine.block_manager.num_blocks

            @property
            def num_free_blocks(self) -> int:
                return engine.block_manager.num_free_blocks

            @property
            def num_used_blocks(self) -> int:
                return engine.block_manager.num_used_blocks

        sched, bm = _Live(), _Pool()

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, list(labels), registry=r)

        gauge("vllm:num_requests_running", "Requests being computed.").labels(**labels).set_function(
            lambda: len(sched.running))
        gauge("vllm:num_requests_waiting", "Requests waiting for admission.").labels(**labels).set_function(
            lambda: len(sched.waiting))
        gauge("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).").labels(**labels).set_function(
            lambda: bm.num_used_blocks / bm.num_blocks if bm.num_blocks else 1.0)
        info = Gauge("vllm:cache_config_info", "KV cache configuration (value is always 1).",
                     ["model_name", "block_size", "num_gpu_blocks", "cache_dtype"], registry=r)
        info.labels(model_name, str(engine.config.block_size), str(bm.num_blocks), engine.config.dtype).set(1)
        gauge("kunserve_kv_blocks_total", "KV blocks in the pool (raw count; grows on drop, shrinks on restore)."
              ).labels(**labels).set_function(lambda: bm.num_blocks)
        gauge("kunserve_kv_blocks_free", "KV blocks not held by any request.").labels(**labels).set_function(
            lambda: bm.num_free_blocks)
        gauge("kunserve_kv_block_bytes", "Bytes of one KV block.").labels(**labels).set_function(
            lambda: engine.kv_cache.block_bytes)
        gauge("kunserve_weight_bytes", "Bytes of resident model weights.").labels(**labels).set_function(
            lambda: engine.weight_bytes)
        gauge("kunserve_layers_held", "Decoder layers this agent holds.").labels(**labels).set_function(
            lambda: len(engine.model.layers))
        gauge("kunserve_layers_dropped", "Decoder layers of the model this agent does not hold.").labels(
            **labels).set_function(lambda: engine.model_config.num_hidden_layers - len(engine.model.layers))
        self._drop = Histogram("kunserve_drop_latency_seconds", "Drop latency: commit to the new KV blocks usable.",
                               list(labels), buckets=_LATENCY_BUCKETS, registry=r).labels(**labels)
        self._restore = Histogram("kunserve_restore_duration_seconds",
                                  "Restore duration on this agent: weights loaded, pool rebuilt, KV back.",
                                  list(labels), buckets=_LATENCY_BUCKETS, registry=r).labels(**labels)
        self._seen: tuple[float | None, float | None] = (None, None)
        preempt = Counter("vllm:num_preemptions", "Requests preempted (recomputed).", list(labels), registry=r)
        preempt.labels(**labels)
        self._preemptions_seen = 0
        self._preempt = preempt.labels(**labels)
        self._sched = sched
        self._ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", list(labels),
                               buckets=_LATENCY_BUCKETS, registry=r).labels(**labels)
        self._itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens.", list(labels),
                              buckets=_LATENCY_BUCKETS, registry=r).labels(**labels)
        self._e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to finish.",
                              list(labels), buckets=_E2E_BUCKETS, registry=r).labels(**labels)
        self._prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.", list(labels),
                                      registry=r).labels(**labels)
        self._generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", list(labels),
                                          registry=r).labels(**labels)
        self._success = Counter("vllm:request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self._model_name = model_name
        self._arrival: dict[str, float] = {}

    def follow(self, member: Member) -> None:
        """Export the agent's group state (epoch, role, remote attention, KV exchange, drop/restore)."""
        member.on_change = self._member_changed
        self.registry.register(_GroupCollector(member, self._model_name))

    def _member_changed(self, member: MemberBase) -> None:
        drop, restore = member.last_drop_s, member.last_restore_s
        if drop is not None and drop != self._seen[0]:
            self._drop.observe(drop)
        if restore is not None and restore != self._seen[1]:
            self._restore.observe(restore)
        self._seen = (drop, restore)

    def observe(self, request_id: str, out: RequestOutput, since_previous_s: float) -> None:
        """Called on the engine thread for every output."""
        if out.new_token_ids:
            self._generation_tokens.inc(len(out.new_token_ids))
            first = request_id not in self._arrival
            if first:
                self._ttft.observe(since_previous_s)
                self._arrival[request_id] = since_previous_s
            else:
                self._itl.observe(since_previous_s)
                self._arrival[request_id] += since_previous_s
        if out.finished:
            total = self._arrival.pop(request_id, since_previous_s)
            self._e2e.observe(total)
            self._prompt_tokens.inc(len(out.prompt_token_ids))
            reason = out.finish_reason.value if out.finish_reason else "unknown"
            self._success.labels(self._model_name, reason).inc()
        delta = self._sched.num_preemptions - self._preemptions_seen
        if delta > 0:
            self._preempt.inc(delta)
            self._preemptions_seen += delta


class _GroupCollector(Collector):
    """Group series read from the member at scrape time."""

    def __init__(self, member: Member, model_name: str) -> None:
        self.member, self.model_name = member, model_name

    def collect(self) -> Iterator[Metric]:
        m, labels = self.member, ["model_name"]
        epoch = GaugeMetricFamily("kunserve_group_epoch", "Topology epoch this agent last committed.", labels=labels)
        epoch.add_metric([self.model_name], m.epoch)
        yield epoch
        role = GaugeMetricFamily("kunserve_group_role", "1 for the agent's current role (replica, leader, stage).",
                                 labels=[*labels, "role"])
        for name in ("replica", "leader", "stage"):
            role.add_metric([self.model_name, name], 1.0 if m.role.name.lower() == name else 0.0)
        yield role
        calls = CounterMetricFamily("kunserve_remote_attention_calls", "Remote attention calls, made and served.",
                                    labels=[*labels, "side"])
        calls.add_metric([self.model_name, "made"], m.remote_attention_calls)
        calls.add_metric([self.model_name, "served"], m.remote_attention_served)
        yield calls
        kv = CounterMetricFamily("kunserve_kv_exchange_bytes", "KV bytes received by the KV exchange and restores.",
                                 labels=labels)
        kv.add_metric([self.model_name], m.kv_bytes_in)
        yield kv
