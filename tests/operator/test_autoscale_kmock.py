"""Autoscaling in the real operator (kopf) against the kmock emulator, with fake agents: a burst makes the pressure
daemon drop *and* raise the agents' StatefulSet to 3 replicas in the same round; the third agent is not Ready
(it does not answer) until the test lets it; once it answers, the group restores. Every drop and restore is a
Reconfiguration; the pool's status.autoscaling follows."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from tests.gateway.processes import RedisProcess, start_redis
from tests.operator.harness import TEST_CONFIG, OperatorHarness
from tests.operator.kubectl import wait_for
from tests.operator.pools import example, with_spec
from tests.operator_unit.fake_agent import FakeAgentsThread, FakeLoad

POOLS = ("kunserve.io/v1alpha1", "servingpools")
RECONFS = ("kunserve.io/v1alpha1", "reconfigurations")
STS = ("apps/v1", "statefulsets")
AGENTS = ("smollm2-agent-0", "smollm2-agent-1", "smollm2-agent-2")
HIGH = FakeLoad(blocks_needed=150, num_waiting=3, num_running=5)
LOW = FakeLoad(blocks_needed=10, num_waiting=0, num_running=1)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def test_a_burst_scales_the_statefulset_and_the_group_restores_when_the_new_agent_is_ready(
        redis_server: RedisProcess) -> None:
    redis_server.client().flushall()
    with FakeAgentsThread(AGENTS) as fakes:
        reachable = {a: fakes.agents[a].endpoint for a in AGENTS[:2]}  # agent-2's pod is not up yet
        config = dataclasses.replace(TEST_CONFIG, redis_url=redis_server.url, plan_interval_s=0.1, stale_after_s=3.0,
                                     pressure_interval_ms=50, rpc_timeout_s=3.0, commit_timeout_s=20.0)
        with OperatorHarness(config=config, agent_endpoint=lambda _ns, _pool, r: reachable.get(r, "127.0.0.1:1")) as h:
            k, ns = h.kubectl, h.new_namespace("autoscale")
            body = with_spec(example(), elasticity={"restoreWindowSeconds": 3600, "maxGroupSize": 2},
                             autoscaling={"minReplicas": 2, "maxReplicas": 3, "targetDemand": 0.7,
                                          "scaleDownStabilizationSeconds": 3600})
            k.create({**body, "metadata": {"name": "smollm2"}}, namespace=ns)
            wait_for(lambda: (k.get_or_none(*STS, ns, "smollm2-agent") or {}).get("spec", {}).get("replicas") == 2,
                     what="the StatefulSet at 2 replicas")

            fakes.agents[AGENTS[0]].load, fakes.agents[AGENTS[1]].load = HIGH, LOW
            drop = wait_for(lambda: next((r for r in k.list(*RECONFS, ns) if r["spec"]["action"] == "Drop"
                                          and (r.get("status") or {}).get("phase") == "Completed"), None),
                            timeout_s=20, what="a completed drop")
            assert drop["spec"]["groups"][0]["members"] == list(AGENTS[:2])
            sts = k.get(*STS, ns, "smollm2-agent")
            assert sts["spec"]["replicas"] == 3  # asked for in the drop's round
            status = wait_for(lambda: (s := k.get(*POOLS, ns, "smollm2")["status"]).get("autoscaling", {}).get(
                "scaleUpFrom") == 2 and s, what="the scale-up in the pool's status")
            auto = status["autoscaling"]
            assert (auto["replicas"], auto["bridge"]) == (3, True) and auto["blocksNeeded"] == 160
            assert auto["replicasDropped"] in (0, 2)  # measured before or after the drop committed
            assert not [r for r in k.list(*RECONFS, ns) if r["spec"]["action"] == "Restore"]  # not Ready: no restore

            fakes.agents[AGENTS[0]].load = LOW  # the burst goes on its way to the new replica ...
            reachable[AGENTS[2]] = fakes.agents[AGENTS[2]].endpoint  # ... which now answers Status: Ready
            restore = wait_for(lambda: next((r for r in k.list(*RECONFS, ns) if r["spec"]["action"] == "Restore"
                                             and (r.get("status") or {}).get("phase") == "Completed"), None),
                               timeout_s=20, what="the bridged restore")
            assert "scale-out bridged" in restore["spec"]["reason"]
            assert restore["spec"]["epoch"] > drop["spec"]["epoch"]
            final = wait_for(lambda: (s := k.get(*POOLS, ns, "smollm2")["status"]).get("groupCount") == 0
                             and "scaleUpFrom" not in s.get("autoscaling", {}) and s, what="the pool after restore")
            assert final["autoscaling"]["replicas"] == 3
            assert k.get(*STS, ns, "smollm2-agent")["spec"]["replicas"] == 3
        assert "Traceback" not in h.output, h.output[-5000:]
