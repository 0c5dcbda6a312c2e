"""Local mode's controller (the operator's loop without Kubernetes) against fake agents and a real redis-server:
a pressure spike drops, manual requests (what `kunserve reconfigure --redis` sends) restore and are checked,
every reconfiguration is stored in Redis and the topology follows."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from kunserve.gateway.topology import Topology
from kunserve.operator.agent_client import AgentClients
from kunserve.operator.cost_model import CostModel
from kunserve.operator.executor import Executor, ExecutorSettings
from kunserve.operator.local import LocalController, records_key, reply_key, requests_key, state_key
from kunserve.operator.local_recovery import recover
from kunserve.operator.pressure import PressureCollector
from kunserve.operator.reconfig import ReconfigPhase
from kunserve.operator.validation import parse_pool
from tests.gateway.processes import RedisProcess, start_redis
from tests.operator_unit.fake_agent import FakeAgent, FakeCluster, FakeLoad

COST = CostModel(num_layers=4, layer_bytes=1000, embed_bytes=0, head_bytes=0, kv_bytes_per_token_layer=10,
                 block_size=2)
POOL = parse_pool({"apiVersion": "kunserve.io/v1alpha1", "kind": "ServingPool",
                   "metadata": {"name": "demo", "namespace": "local"},
                   "spec": {"model": {"name": "tiny", "path": "/unused"}, "replicas": 2,
                            "elasticity": {"maxGroupSize": 2, "restoreWindowSeconds": 3600}}})
IDS = ("demo-agent-0", "demo-agent-1")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@dataclass
class Env:
    controller: LocalController
    redis: Redis
    agents: list[FakeAgent]
    lines: list[str]


@asynccontextmanager
async def env(redis_server: RedisProcess) -> AsyncIterator[Env]:
    cluster = FakeCluster()
    agents = [cluster.add(a) for a in IDS]
    await cluster.start_all(*agents)
    redis = Redis(host="127.0.0.1", port=redis_server.port, decode_responses=True)
    await redis.flushall()
    clients = AgentClients(5)
    lines: list[str] = []
    endpoints = {a.agent_id: a.endpoint for a in agents}
    async with PressureCollector(interval_ms=20, stale_after_s=5) as collector:
        collector.set_targets(endpoints)
        executor = Executor(clients, ExecutorSettings(commit_timeout_s=5, outcome_check_interval_s=0.05))
        controller = LocalController(pool=POOL, redis=redis, endpoints=endpoints, cost=COST, collector=collector,
                                     executor=executor, out=lines.append, gateway_url="http://127.0.0.1:1")
        try:
            await controller.publish()
            await collector.wait_until(lambda c: len(c.snapshot()) == 2, 10)
            yield Env(controller, redis, agents, lines)
        finally:
            await clients.close()
            await redis.aclose()
            await cluster.stop_all()


async def topology(redis: Redis) -> Topology:
    return Topology.from_json(await redis.get("kunserve:topology:demo"))


def test_a_spike_drops_and_a_manual_request_restores(redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        async with env(redis_server) as e:
            c = e.controller
            assert (await topology(e.redis)).epoch == 0 and await c.step() is None  # idle
            e.agents[0].load = FakeLoad(blocks_needed=150, num_waiting=2, num_running=4)
            await c.collector.wait_until(lambda col: col.snapshot()[0].num_waiting == 2, 10)
            drop = await c.step()
            assert drop is not None and drop.record.phase.value == "Completed" and drop.spec.epoch == 1
            assert [g.members for g in c.groups] == [IDS] and c.epoch == 1
            topo = await topology(e.redis)
            assert topo.epoch == 1 and [g.entry for g in topo.groups] == [IDS[0]]
            stored = json.loads(await e.redis.hget(records_key("demo"), "demo-drop-1"))
            assert stored["status"]["phase"] == "Completed" and stored["spec"]["groups"][0]["members"] == list(IDS)
            assert e.lines[-1].startswith("reconfiguration epoch 1 Drop")
            state = json.loads(await e.redis.get(state_key("demo")))
            assert (state["epoch"], [g["id"] for g in state["groups"]]) == (1, [c.groups[0].id])

            # The group's demand is still high: no restore is planned (and the window is an hour anyway).
            assert await c.step() is None
            # A manual restore, as `kunserve reconfigure restore --redis ... --pool demo` sends it.
            await e.redis.rpush(requests_key("demo"), json.dumps({"id": "r1", "action": "Restore"}))
            restore = await c.step()
            assert restore is not None and restore.record.phase.value == "Completed" and restore.spec.epoch == 2
            assert c.groups == () and (await topology(e.redis)).epoch == 2
            reply = json.loads((await e.redis.blpop([reply_key("demo", "r1")], timeout=5))[1])
            assert (reply["name"], reply["status"]["phase"]) == ("demo-restore-2", "Completed")
            assert [a.epoch for a in e.agents] == [2, 2]

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_manual_requests_are_checked_before_any_agent_is_called(redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        async with env(redis_server) as e:
            c = e.controller
            bad = [{"id": "a", "action": "Drop", "members": ["demo-agent-0", "nobody"]},
                   {"id": "b", "action": "Drop", "members": list(IDS), "ranges": [[0, 1], [2, 4]]},
                   {"id": "c", "action": "Restore", "group": "g-none"},
                   {"id": "d", "action": "Sideways"}]
            for request in bad:
                await e.redis.rpush(requests_key("demo"), json.dumps(request))
                assert await c.step() is None
            errors = [json.loads((await e.redis.blpop([reply_key("demo", r["id"])], timeout=5))[1])["error"]
                      for r in bad]
            assert "'nobody' is not a replica" in errors[0]
            assert "contiguous" in errors[1]
            assert "no formed group matches g-none" in errors[2]
            assert "Sideways" in errors[3]
            assert sum(a.counters.prepares for a in e.agents) == 0
            # A drop exactly where it is wanted: 1 layer on the first member, 3 on the second.
            await e.redis.rpush(requests_key("demo"), json.dumps(
                {"id": "ok", "action": "Drop", "members": list(IDS), "ranges": [[0, 1], [1, 4]], "group": "g1"}))
            done = await c.step()
            assert done is not None and done.record.phase.value == "Completed"
            assert (e.agents[0].layer_end, e.agents[1].layer_start, c.groups[0].id) == (1, 1, "g1")

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_restarted_controller_completes_a_commit_it_was_waiting_for(redis_server: RedisProcess) -> None:
    """The controller dies while the leader commits (the record says Preparing, with preparedAt); a new one
    finds the record, asks the leader for its result, publishes the group under the epoch: nothing mixed."""
    async def scenario() -> None:
        async with env(redis_server) as e:
            gate = asyncio.Event()
            e.agents[0].commit_gate = gate
            await e.redis.rpush(requests_key("demo"), json.dumps({"id": "d", "action": "Drop", "members": list(IDS)}))
            crashed = asyncio.create_task(e.controller.step())
            for _ in range(200):  # bounded: the record says every member prepared within a few calls
                raw = await e.redis.hget(records_key("demo"), "demo-drop-1")
                if raw and json.loads(raw)["status"].get("preparedAt"):
                    break
                await asyncio.sleep(0.02)
            crashed.cancel()  # the controller process is gone; the leader's commit goes on
            await asyncio.gather(crashed, return_exceptions=True)
            assert json.loads(await e.redis.hget(records_key("demo"), "demo-drop-1"))["status"]["phase"] == "Preparing"
            assert (await topology(e.redis)).epoch == 0 and e.agents[0].epoch == 0
            gate.set()

            old = e.controller
            new = LocalController(pool=POOL, redis=e.redis, endpoints=dict(old.endpoints), cost=COST,
                                  collector=old.collector, executor=old.executor, out=e.lines.append)
            found = await recover(new, attempts=3, backoff_s=0.05)
            assert found.resumed == {"demo-drop-1": ReconfigPhase.COMPLETED} and found.unknown == ()
            assert (found.epoch, len(found.groups), new.epoch) == (1, 1, 1)
            assert [a.epoch for a in e.agents] == [1, 1] and e.agents[0].counters.commits_applied == 1
            stored = json.loads(await e.redis.hget(records_key("demo"), "demo-drop-1"))
            assert stored["status"]["phase"] == "Completed"
            topo = await topology(e.redis)
            assert topo.epoch == 1 and [g.members for g in topo.groups] == [IDS]
            assert new.take_epoch() == 2  # never an epoch a record holds

            # Restarting again finds nothing to resume and the same state.
            again = LocalController(pool=POOL, redis=e.redis, endpoints=dict(old.endpoints), cost=COST,
                                    collector=old.collector, executor=old.executor, out=e.lines.append)
            found = await recover(again, attempts=1, backoff_s=0.05)
            assert found.resumed == {} and (found.epoch, found.groups) == (1, (new.groups[0].id,))

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_record_whose_leader_is_gone_is_left_as_it_is(redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        async with env(redis_server) as e:
            e.agents[0].commit_gate = asyncio.Event()  # never opened: the leader hangs, then goes away
            await e.redis.rpush(requests_key("demo"), json.dumps({"id": "d", "action": "Drop", "members": list(IDS)}))
            crashed = asyncio.create_task(e.controller.step())
            for _ in range(200):
                raw = await e.redis.hget(records_key("demo"), "demo-drop-1")
                if raw and json.loads(raw)["status"].get("preparedAt"):
                    break
                await asyncio.sleep(0.02)
            crashed.cancel()
            await asyncio.gather(crashed, return_exceptions=True)
            await e.agents[0].stop()
            old = e.controller
            new = LocalController(pool=POOL, redis=e.redis, endpoints=dict(old.endpoints), cost=COST,
                                  collector=old.collector, executor=old.executor, out=e.lines.append)
            found = await recover(new, attempts=2, backoff_s=0.05)
            assert found.resumed == {} and found.unknown == ("demo-drop-1",)
            assert (new.epoch, new.groups, new.take_epoch()) == (0, (), 2)
            assert "outcome unknown, left: demo-drop-1" in e.lines[-1]
            stored = json.loads(await e.redis.hget(records_key("demo"), "demo-drop-1"))
            assert stored["status"]["phase"] == "Preparing" and "do not answer" in stored["status"]["message"]

    asyncio.run(asyncio.wait_for(scenario(), 30))
