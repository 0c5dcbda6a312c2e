"""Shared processes for the gateway tests: one redis-server, two tiny agents and one gateway per session.

Tests that kill or saturate agents start their own (test_fault_replay.py, test_routing.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.processes import GatewayProcess, RedisProcess, start_agents, start_gateway, start_redis
from tests.integration.agent_process import AgentProcess

API_KEY = "sk-test-0123456789abcdef"
MAIN_POOL = "main"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def agents(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AgentProcess]]:
    procs = start_agents(tiny_dir, tmp_path_factory.mktemp("agents"),
                         [("agent-0", ("--num-kv-blocks", "256")), ("agent-1", ("--num-kv-blocks", "256"))])
    yield procs
    for p in procs:
        p.stop()


def static_topology(agents: list[AgentProcess]) -> str:
    return ",".join(f"{a.agent_id}={a.target}" for a in agents)


@pytest.fixture(scope="session")
def gateway(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory, agents: list[AgentProcess],
            redis_server: RedisProcess) -> Iterator[GatewayProcess]:
    """Static topology of the two agents, journal in Redis (pool `main`), one API key from a file."""
    workdir = tmp_path_factory.mktemp("gateway")
    keys = workdir / "keys.txt"
    keys.write_text(f"# test keys\n{API_KEY}\n")
    gw = start_gateway(tiny_dir, workdir, "--pool", MAIN_POOL, "--redis", redis_server.url,
                       "--static-topology", static_topology(agents), "--api-keys-file", str(keys),
                       "--pressure-interval-ms", "100")
    yield gw
    gw.stop()
