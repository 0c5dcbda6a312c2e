"""Read an agent's Prometheus /metrics into a flat dict (benchmarks and the demo; no torch, no gRPC)."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

WANTED = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting",
          "vllm:num_preemptions_total", "kunserve_kv_blocks_total", "kunserve_kv_blocks_free", "kunserve_layers_held",
          "kunserve_group_epoch", "kunserve_remote_attention_calls_total", "kunserve_kv_exchange_bytes_total")


@dataclass(slots=True)
class AgentSample:
    t: float  # seconds since the run started
    agent: str
    kv_usage: float = 0.0
    blocks_total: int = 0
    blocks_free: int = 0
    layers_held: int = 0
    epoch: int = 0
    running: int = 0
    waiting: int = 0


def scrape(host_port: str, timeout: float = 5.0) -> dict[str, float]:
    """Sums per metric name over label sets (remote attention counts both sides)."""
    text = urllib.request.urlopen(f"http://{host_port}/metrics", timeout=timeout).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in WANTED:
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def sample(host_port: str, agent: str, t: float) -> AgentSample:
    m = scrape(host_port)
    return AgentSample(t=t, agent=agent, kv_usage=m.get("vllm:kv_cache_usage_perc", 0.0),
                       blocks_total=int(m.get("kunserve_kv_blocks_total", 0)),
                       blocks_free=int(m.get("kunserve_kv_blocks_free", 0)),
                       layers_held=int(m.get("kunserve_layers_held", 0)), epoch=int(m.get("kunserve_group_epoch", 0)),
                       running=int(m.get("vllm:num_requests_running", 0)),
                       waiting=int(m.get("vllm:num_requests_waiting", 0)))
