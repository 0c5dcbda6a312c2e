"""End to end with real agent processes: a drop then a restore through the operator's executor (the same
`drop_group` / `restore_group` that `kunserve reconfigure --agents` and benchmarks use).

Skipped while the agent does not implement Agent.Prepare (it answers UNIMPLEMENTED); it turns on by itself when
the agent does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kunserve.operator.agent_client import AgentClients, AgentRole, AgentStatus
from kunserve.operator.executor import ExecutorSettings, drop_group, restore_group
from kunserve.operator.reconfig import ReconfigPhase
from kunserve.rpc.v1 import agent_pb2, agent_pb2_grpc
from tests.gateway.processes import start_agents
from tests.integration.agent_process import AgentProcess

SETTINGS = ExecutorSettings(prepare_timeout_s=60, commit_timeout_s=120, abort_timeout_s=10, status_timeout_s=10)


@pytest.fixture(scope="module")
def agents(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AgentProcess]]:
    procs = start_agents(tiny_dir, tmp_path_factory.mktemp("reconf-agents"),
                         [(f"agent-{i}", ("--memory-budget", "64MiB")) for i in range(2)])
    yield procs
    for p in procs:
        p.stop()


def implements_prepare(agent: AgentProcess) -> bool:
    """Prepare with an unspecified action: an agent that implements it refuses it (INVALID_ARGUMENT or
    FAILED_PRECONDITION); one that does not answers UNIMPLEMENTED."""
    with agent.channel() as channel:
        try:
            agent_pb2_grpc.AgentStub(channel).Prepare(agent_pb2.PrepareRequest(epoch=0), timeout=10)
        except grpc.RpcError as exc:
            return bool(exc.code() != grpc.StatusCode.UNIMPLEMENTED)
    return True


async def statuses(endpoints: dict[str, str]) -> list[AgentStatus]:
    clients = AgentClients()
    try:
        return [await clients.status(e) for e in endpoints.values()]
    finally:
        await clients.close()


def test_drop_then_restore_on_real_agents(agents: list[AgentProcess]) -> None:
    if not implements_prepare(agents[0]):
        pytest.skip("the agent does not implement Agent.Prepare yet")
    endpoints = {a.agent_id: a.target for a in agents}
    before = asyncio.run(statuses(endpoints))
    num_layers = before[0].num_layers
    half = num_layers // 2

    dropped = asyncio.run(drop_group(endpoints, [(0, half), (half, num_layers)], settings=SETTINGS, group_id="g1"))
    assert dropped.record.phase is ReconfigPhase.COMPLETED, dropped.record.message
    assert dropped.record.committed_groups == ("g1",)
    during = asyncio.run(statuses(endpoints))
    assert [(s.layer_start, s.layer_end, s.role) for s in during] == [
        (0, half, AgentRole.LEADER), (half, num_layers, AgentRole.STAGE)]
    assert all(s.epoch == dropped.spec.epoch for s in during)
    assert all(d.weight_bytes < b.weight_bytes for b, d in zip(before, during, strict=True))  # layers dropped
    assert [(m.agent_id, m.layer_start, m.layer_end) for m in dropped.record.members] == [
        (s.agent_id, s.layer_start, s.layer_end) for s in during]

    restored = asyncio.run(restore_group({agents[1].agent_id: agents[1].target}, settings=SETTINGS))
    assert restored.record.phase is ReconfigPhase.COMPLETED, restored.record.message
    assert restored.spec.epoch == dropped.spec.epoch + 1 and restored.spec.groups[0].members == tuple(endpoints)
    after = asyncio.run(statuses(endpoints))
    assert [(s.layer_start, s.layer_end, s.role, s.epoch) for s in after] == [
        (0, num_layers, AgentRole.REPLICA, restored.spec.epoch)] * 2
    assert [s.kv_blocks_total for s in after] == [s.kv_blocks_total for s in before]
