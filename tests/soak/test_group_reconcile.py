"""A group whose member crashed in the cooperative phase: the survivor disbands itself (every layer back,
serving alone); local mode's controller notices (the survivor reports serving alone at the group's epoch),
forgets the group and publishes a topology without it, so the members can be grouped again."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from redis.asyncio import Redis

from kunserve.operator.agent_client import AgentClients
from kunserve.operator.executor import Executor
from kunserve.operator.local import local_cost_model
from kunserve.operator.local_controller import LocalController
from kunserve.operator.plan_types import StagePlan
from kunserve.operator.pressure import PressureCollector
from kunserve.operator.reconfig import Action, GroupChange, ReconfigPhase, ReconfigSpec
from kunserve.operator.topology_writer import topology_key
from kunserve.operator.validation import parse_pool
from kunserve.rpc.v1 import agent_pb2
from tests.gateway.processes import start_redis
from tests.integration.agent_process import start_agent
from tests.integration.group_driver import status, wait_until


def test_the_controller_forgets_a_group_whose_members_left_it(tiny_dir: Path, tmp_path: Path) -> None:
    redis_proc = start_redis(tmp_path / "redis")
    args = ("--num-kv-blocks", "64", "--rpc-timeout", "5")
    agents = [start_agent(tiny_dir, tmp_path / f"a{i}", "--agent-id", f"p-agent-{i}", *args) for i in range(2)]
    try:
        pool = parse_pool({"apiVersion": "kunserve.io/v1alpha1", "kind": "ServingPool",
                           "metadata": {"name": "p", "namespace": "local"},
                           "spec": {"model": {"name": "tiny", "path": str(tiny_dir)}, "replicas": 2,
                                    "elasticity": {"enabled": False}}})
        endpoints = {a.agent_id: a.target for a in agents}
        stages = (StagePlan("p-agent-0", 0, 4), StagePlan("p-agent-1", 4, 8))
        drop = ReconfigSpec(pool="p", epoch=1, action=Action.DROP,
                            groups=(GroupChange("g", ("p-agent-0", "p-agent-1"), stages),), reason="t", manual=True)

        async def scenario() -> tuple[int, list[str], dict[str, object]]:
            redis = Redis.from_url(redis_proc.url, decode_responses=True)
            clients = AgentClients(10.0)
            ctl = LocalController(pool=pool, redis=redis, endpoints=endpoints, cost=local_cost_model(pool),
                                  collector=PressureCollector(clients), executor=Executor(clients))
            ctl.collector.set_targets(endpoints)  # as local mode does: follow every agent's pressure
            try:
                await ctl.publish()
                assert (await ctl.run(drop)).record.phase is ReconfigPhase.COMPLETED
                agents[0].proc.send_signal(signal.SIGKILL)
                agents[0].proc.wait(10)
                await asyncio.to_thread(wait_until, lambda: status(agents[1]).role == agent_pb2.ROLE_REPLICA, 30, 0.2)
                agents[0] = await asyncio.to_thread(start_agent, tiny_dir, tmp_path / "a0", "--agent-id", "p-agent-0",
                                                    *args, "--port", str(agents[0].grpc_port))
                restore = ReconfigSpec(pool="p", epoch=ctl.take_epoch(), action=Action.RESTORE, groups=drop.groups,
                                       reason="t", manual=True)
                phase = (await ctl.run(restore)).record.phase
                for _ in range(50):  # bounded: the collector hears the survivor within a few intervals
                    await ctl.step()
                    if not ctl.groups:
                        break
                    await asyncio.sleep(0.2)
                topo = json.loads(await redis.get(topology_key("p")) or "{}")
                return int(phase is ReconfigPhase.ROLLED_BACK), [g.id for g in ctl.groups], topo
            finally:
                await clients.close()
                await redis.aclose()

        rolled_back, groups, topo = asyncio.run(scenario())
        assert [status(a).role for a in agents] == [agent_pb2.ROLE_REPLICA, agent_pb2.ROLE_REPLICA]
        assert rolled_back == 1  # both agents refuse to restore a group they are not in
        assert groups == [], f"the controller still has groups {groups}"
        assert not topo.get("groups"), f"the topology still has groups {topo.get('groups')}"
    finally:
        for a in agents:
            a.stop()
        redis_proc.stop()
