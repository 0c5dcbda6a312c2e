"""Elasticity end to end in the real operator (kopf, the production handlers) against the kmock emulator:
fake agents (gRPC servers with the Agent service) report pressure, the pressure daemon plans, Reconfiguration
resources carry drops and restores through Prepare / Commit, the pool's status and the topology in a real
redis-server follow. And an operator killed in the middle of a reconfiguration neither repeats nor loses it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pytest

from kunserve.gateway.topology import Topology
from kunserve.rpc.v1 import agent_pb2
from tests.gateway.processes import RedisProcess, start_redis
from tests.operator.emulator import EmulatorThread
from tests.operator.harness import TEST_CONFIG, OperatorHarness
from tests.operator.kubectl import Kubectl, wait_for
from tests.operator.pools import example, with_spec
from tests.operator_unit.fake_agent import FakeAgentsThread, FakeLoad

POOLS = ("kunserve.io/v1alpha1", "servingpools")
RECONFS = ("kunserve.io/v1alpha1", "reconfigurations")
AGENTS = ("smollm2-agent-0", "smollm2-agent-1")
HIGH = FakeLoad(blocks_needed=150, num_waiting=3, num_running=5)  # demand 1.5 of 100 blocks with a queue
LOW = FakeLoad(blocks_needed=10, num_waiting=0, num_running=1)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def fakes(redis_server: RedisProcess) -> Iterator[FakeAgentsThread]:
    redis_server.client().flushall()  # every test's pool is `smollm2`: start from an empty serving plane
    with FakeAgentsThread(AGENTS) as agents:
        yield agents


def harness_for(redis_server: RedisProcess, fakes: FakeAgentsThread, emulator: EmulatorThread | None = None,
                **options: Any) -> OperatorHarness:
    config = dataclasses.replace(TEST_CONFIG, redis_url=redis_server.url, plan_interval_s=0.1, stale_after_s=3.0,
                                 pressure_interval_ms=50, rpc_timeout_s=3.0, commit_timeout_s=20.0)
    endpoints = fakes.endpoints()
    return OperatorHarness(config=config, emulator=emulator,
                           agent_endpoint=lambda _ns, _pool, replica: endpoints.get(replica, "127.0.0.1:1"), **options)


def submit_pool(k: Kubectl, ns: str, planner: bool = True) -> None:
    body = with_spec(example(), elasticity={"enabled": planner, "restoreWindowSeconds": 0, "maxGroupSize": 2})
    k.create({**body, "metadata": {"name": "smollm2"}}, namespace=ns)


def set_load(fakes: FakeAgentsThread, **loads: FakeLoad) -> None:
    for agent, load in loads.items():
        fakes.agents[agent].load = load


def reconfigurations(k: Kubectl, ns: str) -> list[dict[str, Any]]:
    return sorted(k.list(*RECONFS, ns), key=lambda r: r["spec"]["epoch"])


def completed(k: Kubectl, ns: str, action: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        for r in reconfigurations(k, ns):
            if r["spec"]["action"] == action and (r.get("status") or {}).get("phase") == "Completed":
                return r
        return None

    return wait_for(probe, timeout_s=20, what=f"a completed {action}")


def reconfiguring_is(status: dict[str, Any], value: str) -> bool:
    return any(c["type"] == "Reconfiguring" and c["status"] == value for c in status.get("conditions") or [])


def topology(redis_server: RedisProcess) -> Topology | None:
    raw = redis_server.client().get("kunserve:topology:smollm2")
    return None if raw is None else Topology.from_json(raw)  # the gateway's own parser accepts it


def test_a_pressure_spike_drops_and_falling_pressure_restores(redis_server: RedisProcess,
                                                              fakes: FakeAgentsThread) -> None:
    with harness_for(redis_server, fakes) as h:
        k, ns = h.kubectl, h.new_namespace("elastic")
        submit_pool(k, ns)
        initial = wait_for(lambda: topology(redis_server), what="the initial topology")
        assert (initial.epoch, [r.id for r in initial.routable()]) == (0, list(AGENTS))
        assert initial.replica(AGENTS[0]).endpoint == fakes.agents[AGENTS[0]].endpoint  # type: ignore[union-attr]

        set_load(fakes, **{AGENTS[0]: HIGH, AGENTS[1]: LOW})
        drop = completed(k, ns, "Drop")
        assert drop["metadata"]["name"] == "smollm2-drop-1"
        spec, status = drop["spec"], drop["status"]
        assert (spec["pool"], spec["epoch"], spec["manual"]) == ("smollm2", 1, False)
        group = spec["groups"][0]
        assert group["members"] == list(AGENTS)
        assert group["stages"] == [{"replica": AGENTS[0], "layerStart": 0, "layerEnd": 2},
                                   {"replica": AGENTS[1], "layerStart": 2, "layerEnd": 4}]
        assert "smollm2-agent-0 demand 1.50 with 3 waiting" in spec["reason"]
        assert {p["replica"]: p["blocksNeeded"] for p in spec["pressure"]} == {AGENTS[0]: 150, AGENTS[1]: 10}
        assert status["attempts"] == 1 and status["committedGroups"] == [group["id"]]
        assert set(status["timings"]) >= {"startedAt", "preparedAt", "committedAt", "completedAt", "totalSeconds"}
        assert drop["metadata"]["ownerReferences"][0]["name"] == "smollm2"

        pool = wait_for(lambda: (s := k.get(*POOLS, ns, "smollm2")["status"]).get("groupCount") == 1
                        and reconfiguring_is(s, "False") and s, what="the group in the pool's status")
        assert pool["epoch"] == 1 and pool["lastReconfiguration"] == "smollm2-drop-1" and pool["modelLayers"] == 4
        assert pool["groups"] == [{"id": group["id"], "members": list(AGENTS), "stages": group["stages"], "epoch": 1,
                                   "state": "Cooperative", "reconfiguration": "smollm2-drop-1"}]
        assert pool["phase"] != "Reconfiguring"

        topo = wait_for(lambda: (t := topology(redis_server)) and t.epoch == 1 and t, what="topology epoch 1")
        assert [(g.id, g.members, g.entry) for g in topo.groups] == [(group["id"], AGENTS, AGENTS[0])]
        assert [(r.role.value, r.stage, r.layer_start, r.layer_end, r.entry) for r in topo.replicas] == [
            ("stage", 0, 0, 2, True), ("stage", 1, 2, 4, True)]
        leader = fakes.agents[AGENTS[0]]
        assert (leader.role, leader.epoch, leader.counters.commits_applied) == (agent_pb2.ROLE_LEADER, 1, 1)

        set_load(fakes, **{AGENTS[0]: LOW, AGENTS[1]: LOW})
        restore = completed(k, ns, "Restore")
        assert restore["spec"]["epoch"] == 2 and restore["spec"]["groups"][0]["id"] == group["id"]
        pool = wait_for(lambda: (s := k.get(*POOLS, ns, "smollm2")["status"]).get("epoch") == 2 and s,
                        what="epoch 2 in the pool's status")
        assert (pool["groups"], pool["groupCount"], pool["lastReconfiguration"]) == ([], 0, "smollm2-restore-2")
        topo = wait_for(lambda: (t := topology(redis_server)) and t.epoch == 2 and t, what="topology epoch 2")
        assert topo.groups == () and [r.id for r in topo.routable()] == list(AGENTS)
        assert all(a.role == agent_pb2.ROLE_REPLICA and a.epoch == 2 for a in fakes.agents.values())
        assert [r["spec"]["epoch"] for r in reconfigurations(k, ns)] == [1, 2]  # nothing more planned
    assert "Traceback" not in h.output, h.output[-5000:]


def test_a_hand_written_reconfiguration_with_a_stale_epoch_fails_untouched(redis_server: RedisProcess,
                                                                            fakes: FakeAgentsThread) -> None:
    with harness_for(redis_server, fakes) as h:
        k, ns = h.kubectl, h.new_namespace("manual")
        submit_pool(k, ns, planner=False)  # only hand-written reconfigurations
        wait_for(lambda: topology(redis_server), what="the initial topology")
        manual = {"apiVersion": "kunserve.io/v1alpha1", "kind": "Reconfiguration", "metadata": {"name": "by-hand"},
                  "spec": {"pool": "smollm2", "epoch": 5, "action": "Drop", "manual": True, "reason": "rehearsal",
                           "groups": [{"id": "g1", "members": list(AGENTS), "stages": [
                               {"replica": AGENTS[0], "layerStart": 0, "layerEnd": 1},
                               {"replica": AGENTS[1], "layerStart": 1, "layerEnd": 4}]}]}}
        k.create(manual, namespace=ns)
        done = wait_for(lambda: (r := k.get(*RECONFS, ns, "by-hand")).get("status", {}).get("phase") == "Completed"
                        and r, what="the manual drop completed")
        assert done["status"]["committedGroups"] == ["g1"]
        assert (fakes.agents[AGENTS[0]].layer_end, fakes.agents[AGENTS[0]].epoch) == (1, 5)
        pool = wait_for(lambda: (s := k.get(*POOLS, ns, "smollm2")["status"]).get("epoch") == 5 and s,
                        what="epoch 5")
        assert [g["id"] for g in pool["groups"]] == ["g1"]
        stale = json.loads(json.dumps(manual))
        stale["metadata"]["name"] = "stale"
        stale["spec"]["action"], stale["spec"]["epoch"] = "Restore", 4
        k.create(stale, namespace=ns)
        failed = wait_for(lambda: (r := k.get(*RECONFS, ns, "stale")).get("status", {}).get("phase") == "Failed"
                          and r, what="the stale restore failed")
        assert "epoch 4 is not newer than the pool's epoch 5" in failed["status"]["message"]
        assert sum(a.counters.prepares for a in fakes.agents.values()) == 2  # only the drop's
    assert "Traceback" not in h.output, h.output[-5000:]


def test_an_operator_killed_mid_reconfiguration_resumes_it_once(redis_server: RedisProcess,
                                                                fakes: FakeAgentsThread) -> None:
    leader = fakes.agents[AGENTS[0]]
    gate = fakes.call(asyncio.Event)
    leader.commit_gate = gate  # the leader's commit hangs until the gate opens
    with EmulatorThread() as emulator:
        with harness_for(redis_server, fakes, emulator, exit_timeout_s=0.3) as first:
            k, ns = first.kubectl, first.new_namespace("killed")
            submit_pool(k, ns)
            set_load(fakes, **{AGENTS[0]: HIGH, AGENTS[1]: LOW})
            wait_for(lambda: leader.counters.commit_calls >= 1, timeout_s=20, what="the Commit sent")
            in_flight = k.get(*RECONFS, ns, "smollm2-drop-1")
            assert in_flight["status"]["phase"] == "Preparing" and "preparedAt" in in_flight["status"]["timings"]
        # The operator is gone; the leader finishes its commit meanwhile (the result was never recorded).
        assert k.get(*RECONFS, ns, "smollm2-drop-1")["status"]["phase"] == "Preparing"
        fakes.call(gate.set)
        wait_for(lambda: leader.counters.commits_applied == 1, what="the leader committed")

        with harness_for(redis_server, fakes, emulator) as second:
            done = completed(k, ns, "Drop")
            assert done["metadata"]["name"] == "smollm2-drop-1" and done["status"]["attempts"] == 2
            assert [(m["agentId"], m["layerEnd"]) for m in done["status"]["members"]] == [(AGENTS[0], 2),
                                                                                        (AGENTS[1], 4)]
            assert leader.counters.commits_applied == 1 and leader.commit_log == [1]  # not repeated
            pool = wait_for(lambda: (s := k.get(*POOLS, ns, "smollm2")["status"]).get("groupCount") == 1 and s,
                            what="the group recorded")
            assert pool["epoch"] == 1
            set_load(fakes, **{AGENTS[0]: LOW, AGENTS[1]: LOW})
            completed(k, ns, "Restore")
            assert [(r["spec"]["action"], r["spec"]["epoch"]) for r in reconfigurations(k, ns)] == [
                ("Drop", 1), ("Restore", 2)]  # none lost, none repeated, epochs increasing
            assert leader.commit_log == [1, 2]
        assert "Traceback" not in first.output + second.output, (first.output + second.output)[-5000:]
