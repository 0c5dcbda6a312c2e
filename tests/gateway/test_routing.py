"""Routing by live pressure: a replica with a full queue or down gets nothing; none left -> 503 + Retry-After.

This gateway runs without Redis (static topology, journal off).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kunserve.rpc.v1 import inference_pb2, inference_pb2_grpc
from tests.gateway.conftest import static_topology
from tests.gateway.processes import GatewayProcess, prometheus_value, request, start_agents, start_gateway, wait_until
from tests.integration.agent_process import AgentProcess

MAX_QUEUE = 2
FILLERS = 6


@pytest.fixture(scope="module")
def routed(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AgentProcess]]:
    procs = start_agents(tiny_dir, tmp_path_factory.mktemp("routing"),
                         [("busy", ("--max-num-seqs", "1")), ("spare", ())])
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def routing_gateway(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                    routed: list[AgentProcess]) -> Iterator[GatewayProcess]:
    gw = start_gateway(tiny_dir, tmp_path_factory.mktemp("routing-gw"), "--static-topology", static_topology(routed),
                       "--max-queue", str(MAX_QUEUE), "--pressure-interval-ms", "50")
    yield gw
    gw.stop()


def _replicas(gw: GatewayProcess) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in json.loads(request(gw.base_url, "GET", "/health")[2])["replicas"]}


def _finished(agent: AgentProcess) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=10) as resp:
        return prometheus_value(resp.read().decode(), "vllm:e2e_request_latency_seconds_count")


def _kill(agent: AgentProcess) -> None:
    """Down at once (a graceful stop waits out the gateway's open pressure stream)."""
    agent.proc.kill()
    agent.proc.wait(10)


def _complete(gw: GatewayProcess) -> tuple[int, dict[str, str], dict[str, Any]]:
    status, headers, body = request(gw.base_url, "POST", "/v1/completions",
                                    {"model": "tiny", "prompt": "Route me", "max_tokens": 4})
    return status, headers, json.loads(body)


def test_full_queue_and_down_replicas_are_avoided(routing_gateway: GatewayProcess,
                                                  routed: list[AgentProcess]) -> None:
    busy, spare = routed
    wait_until(lambda: all(r["health"] == "up" for r in _replicas(routing_gateway).values()), 20, what="both up")
    channel = grpc.insecure_channel(busy.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    fillers = [stub.Generate(inference_pb2.GenerateRequest(
        request_id=f"filler-{i}", token_ids=inference_pb2.TokenIds(ids=[5, 6, 7, 8 + i]),
        sampling=inference_pb2.SamplingParams(max_tokens=1900, ignore_eos=True)), timeout=120)
        for i in range(FILLERS)]
    try:
        wait_until(lambda: _replicas(routing_gateway)["busy"]["queue"] >= MAX_QUEUE, 20, what="busy queue full")
        busy_before, spare_before = _finished(busy), _finished(spare)
        for _ in range(4):
            status, _, body = _complete(routing_gateway)
            assert status == 200, body
        assert _finished(spare) == spare_before + 4 and _finished(busy) == busy_before

        _kill(spare)
        wait_until(lambda: _replicas(routing_gateway)["spare"]["health"] == "down", 20, what="spare down")
        status, headers, body = _complete(routing_gateway)  # busy's queue is full, spare is down
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert body["error"]["code"] == "no_replica_available" and "busy" in body["error"]["message"]
    finally:
        for call in fillers:
            call.cancel()
        channel.close()
    wait_until(lambda: _replicas(routing_gateway)["busy"]["queue"] == 0, 20, what="busy queue drained")
    status, _, body = _complete(routing_gateway)
    assert status == 200, body

    _kill(busy)
    wait_until(lambda: _replicas(routing_gateway)["busy"]["health"] == "down", 20, what="busy down")
    status, headers, body = _complete(routing_gateway)  # nothing is up
    assert status == 503 and headers["retry-after"] == "1"
    health = json.loads(request(routing_gateway.base_url, "GET", "/health")[2])
    assert health["status"] == "no_replica_available"
    metrics = request(routing_gateway.base_url, "GET", "/metrics")[2].decode()
    assert prometheus_value(metrics, "kunserve_gateway_no_replica_total") >= 2
    assert prometheus_value(metrics, "kunserve_gateway_requests_total", 'status="503"') >= 2
