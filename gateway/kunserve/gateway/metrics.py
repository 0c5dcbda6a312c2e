"""Prometheus metrics of a gateway (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0)


class GatewayMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.model_name = model_name
        self.requests = Counter(
            "kunserve_gateway_requests_total", "HTTP requests by route and response status code.",
            ["route", "status"], registry=r)
        self.ttft = Histogram(
            "kunserve_gateway_time_to_first_token_seconds",
            "Time from accepting a generation request to its first token leaving the gateway.",
            ["endpoint"], buckets=_TTFT_BUCKETS, registry=r)
        self.e2e = Histogram(
            "kunserve_gateway_request_duration_seconds", "Time from accepting a generation request to its end.",
            ["endpoint"], buckets=_E2E_BUCKETS, registry=r)
        self.replays = Counter(
            "kunserve_gateway_replays_total", "Requests re-submitted to another replica after a broken stream.",
            ["reason"], registry=r)
        self.in_flight = Gauge(
            "kunserve_gateway_requests_in_flight", "Generation requests accepted and not finished.", registry=r)
        self.prompt_tokens = Counter(
            "kunserve_gateway_prompt_tokens_total", "Prompt tokens of accepted requests.", registry=r)
        self.generation_tokens = Counter(
            "kunserve_gateway_generation_tokens_total", "Tokens streamed to clients.", registry=r)
        self.stream_errors = Counter(
            "kunserve_gateway_stream_errors_total", "Streams that ended with an error event after starting.",
            ["code"], registry=r)
        self.rejected = Counter(
            "kunserve_gateway_no_replica_total", "Requests refused with 503 because no replica could admit.",
            registry=r)

    def topology_gauges(self, epoch: Callable[[], float], routable_up: Callable[[], float]) -> None:
        Gauge("kunserve_gateway_topology_epoch", "Epoch of the topology the gateway routes by.",
              registry=self.registry).set_function(epoch)
        Gauge("kunserve_gateway_replicas_available", "Routable replicas whose pressure stream is up.",
              registry=self.registry).set_function(routable_up)
