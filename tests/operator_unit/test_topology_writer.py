"""The topology the operator writes is the one the gateway reads: built, stored and announced per the contract in
gateway/kunserve/gateway/topology.py, checked with the gateway's own parser and Redis follower."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis

from kunserve.gateway import topology as gateway_topology
from kunserve.gateway.topology import Role, Topology
from kunserve.gateway.topology_source import RedisTopologyFollower
from kunserve.operator import topology_writer
from kunserve.operator.plan_types import StagePlan
from kunserve.operator.reconfig import FormedGroup
from kunserve.operator.topology_writer import (
    ReplicaEndpoint,
    StaleTopologyError,
    build_topology,
    same_layout,
    write_topology,
)
from tests.gateway.processes import RedisProcess, start_redis

REPLICAS = [ReplicaEndpoint(f"a-{i}", f"127.0.0.1:{5000 + i}") for i in range(3)]
GROUP = FormedGroup("g1", (StagePlan("a-1", 0, 10), StagePlan("a-2", 10, 30)), epoch=4)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def test_keys_are_the_gateways() -> None:
    assert topology_writer.TOPOLOGY_KEY == gateway_topology.TOPOLOGY_KEY
    assert topology_writer.EVENTS_CHANNEL == gateway_topology.EVENTS_CHANNEL


def test_the_gateway_accepts_the_document_with_every_group_member_an_entry() -> None:
    doc = build_topology(epoch=4, model="m", replicas=REPLICAS, groups=[GROUP], num_layers=30, updated_at=1.5)
    topo = Topology.from_json(json.dumps(doc))
    assert (topo.epoch, topo.model, topo.updated_at) == (4, "m", 1.5)
    assert [(r.id, r.group, r.role, r.stage, r.layer_start, r.layer_end, r.entry) for r in topo.replicas] == [
        ("a-0", None, Role.REPLICA, None, 0, 30, True),
        ("a-1", "g1", Role.STAGE, 0, 0, 10, True),
        ("a-2", "g1", Role.STAGE, 1, 10, 30, True)]
    assert [(g.id, g.members, g.entry) for g in topo.groups] == [("g1", ("a-1", "a-2"), "a-1")]
    # Every member takes requests (it forwards them to the leader and keeps the stream), and the lone replica.
    assert [r.id for r in topo.routable()] == ["a-0", "a-1", "a-2"]

    plain = Topology.from_dict(build_topology(epoch=0, model="m", replicas=REPLICAS, groups=[], num_layers=None,
                                              updated_at=0.0))
    assert [r.id for r in plain.routable()] == ["a-0", "a-1", "a-2"] and plain.replicas[0].layer_end is None


def test_layouts_and_bad_groups() -> None:
    a = build_topology(epoch=1, model="m", replicas=REPLICAS, groups=[GROUP], num_layers=30, updated_at=1.0)
    b = build_topology(epoch=7, model="m", replicas=REPLICAS, groups=[GROUP], num_layers=None, updated_at=2.0)
    assert same_layout(a, b)  # epoch, time and a lone replica's layer range aside
    assert not same_layout(a, build_topology(epoch=1, model="m", replicas=REPLICAS[:2], groups=[], num_layers=30,
                                             updated_at=1.0))
    with pytest.raises(ValueError, match="not replicas"):
        build_topology(epoch=1, model="m", replicas=REPLICAS[:2], groups=[GROUP], num_layers=30, updated_at=0.0)
    with pytest.raises(ValueError, match="in groups"):
        build_topology(epoch=1, model="m", replicas=REPLICAS, groups=[GROUP, FormedGroup("g2", GROUP.stages, 5)],
                       num_layers=30, updated_at=0.0)


def test_write_sets_then_publishes_and_never_goes_back(redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        redis = Redis(host="127.0.0.1", port=redis_server.port, decode_responses=True)
        applied: list[Topology] = []
        follower = RedisTopologyFollower(redis, redis, "w", applied.append)
        try:
            async with redis.pubsub() as pubsub:
                await pubsub.subscribe(topology_writer.events_channel("w"))
                await pubsub.get_message(timeout=1)  # the subscribe confirmation
                doc = build_topology(epoch=3, model="m", replicas=REPLICAS, groups=[GROUP], num_layers=30,
                                     updated_at=1.0)
                await write_topology(redis, "w", doc)
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
                assert message is not None and message["data"] == "3"
            assert await follower.refresh() and applied[-1].groups[0].id == "g1"
            await write_topology(redis, "w", doc)  # the same epoch again (a resumed reconfiguration): harmless
            with pytest.raises(StaleTopologyError, match="holds epoch 3, newer than 2"):
                await write_topology(redis, "w", {**doc, "epoch": 2})
            assert json.loads(await redis.get("kunserve:topology:w"))["epoch"] == 3
            await write_topology(redis, "w", {**doc, "epoch": 4, "groups": [], "replicas": doc["replicas"][:1]})
            assert await follower.refresh() and applied[-1].epoch == 4 and applied[-1].groups == ()
        finally:
            await redis.aclose()

    asyncio.run(asyncio.wait_for(scenario(), 20))
