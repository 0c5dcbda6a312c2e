"""The coordinated autoscaling policy (autoscale.step, controller.decide_round), with exact expected decisions.

Model: 4 layers of 1000 bytes, 10 KV bytes per token per layer, blocks of 2 tokens: a full replica's block is
80 bytes, so a pool of 8000 bytes holds 100 blocks. In a 2-stage group each stage frees 2000 bytes and its
blocks hold 2 layers (40 bytes): 10000 bytes = 250 blocks; alone again it holds 100.
"""

from __future__ import annotations

import datetime

import pytest

from kunserve.operator.autoscale import (
    AutoscalePolicy,
    Driver,
    ScaleEvent,
    ScaleState,
    ScaleUp,
    recommend,
    restore_order,
    step,
)
from kunserve.operator.autoscale_status import PoolMetrics, state_from_status, status_of
from kunserve.operator.controller import decide_round
from kunserve.operator.cost_model import CostModel
from kunserve.operator.plan_types import ActiveGroup, PoolSpec, ReplicaPressure, StagePlan
from kunserve.operator.pool_signals import measure
from kunserve.operator.reconfig import Action, FormedGroup
from kunserve.operator.validation import parse_pool

COST = CostModel(num_layers=4, layer_bytes=1000, embed_bytes=0, head_bytes=0, kv_bytes_per_token_layer=10,
                 block_size=2)
SPEC = PoolSpec(drop_demand=0.9, restore_demand=0.5, restore_window_s=30, max_group_size=2)
POLICY = AutoscalePolicy(min_replicas=2, max_replicas=6, target_demand=0.7, scale_up_window_s=0,
                         scale_down_window_s=60, drain_timeout_s=30)


def name(i: int) -> str:
    return f"p-agent-{i}"


def alone(i: int, need: int, waiting: int = 0, running: int = 0, stale: bool = False) -> ReplicaPressure:
    return ReplicaPressure(name(i), "m", need, 100, waiting, running, kv_pool_bytes=8000, stale=stale,
                           home_blocks_needed=need)


def staged(i: int, group: str, need: int, home: int | None, waiting: int = 0) -> ReplicaPressure:
    return ReplicaPressure(name(i), "m", need, 250, waiting, 1, kv_pool_bytes=10000, group=group,
                           home_blocks_needed=home)


def pair(gid: str, a: int, b: int) -> ActiveGroup:
    return ActiveGroup(gid, "m", (StagePlan(name(a), 0, 2), StagePlan(name(b), 2, 4)))


def formed(g: ActiveGroup) -> FormedGroup:
    return FormedGroup(g.group_id, g.stages, 1, "p-drop-1")


def run(pressures: list[ReplicaPressure], groups: list[ActiveGroup], state: ScaleState, now: float = 100.0,
        dropping: bool = False, policy: AutoscalePolicy = POLICY, external: int | None = None):  # type: ignore[no-untyped-def]
    return step(pressures, groups, state, pool="p", spec=SPEC, cost=COST, policy=policy, now=now,
                dropping=dropping, external=external)


# ------------------------------------------------------------------------------------------------ signals


def test_signals_count_full_capacity_so_a_drop_never_reads_as_load_falling() -> None:
    before = measure([alone(0, 150, waiting=3), alone(1, 60)], [], COST, replicas=2, desired=2)
    assert (before.blocks_needed, before.blocks_full, before.blocks_total, before.replicas_dropped) == (
        210, 200, 200, 0)
    g = pair("g1", 0, 1)
    # The same requests once the two replicas dropped: each stage holds 250 blocks, every request on both.
    after = measure([staged(0, "g1", 210, 150), staged(1, "g1", 210, 60)], [g], COST, replicas=2, desired=2)
    assert (after.blocks_needed, after.blocks_full, after.blocks_total, after.replicas_dropped) == (210, 200, 500, 2)
    assert after.demand == before.demand == pytest.approx(1.05)
    # A member that cannot tell its home need: the group's need is counted once (the largest stage need).
    unknown = measure([staged(0, "g1", 210, None), staged(1, "g1", 200, 60)], [g], COST, replicas=2, desired=2)
    assert unknown.blocks_needed == 210
    assert measure([alone(0, 10, stale=True)], [], COST, replicas=1, desired=1).ready_replicas == 0


def test_recommendation_carries_the_need_at_target_demand_of_full_capacity() -> None:
    sig = measure([alone(0, 150, waiting=3), alone(1, 60)], [], COST, replicas=2, desired=2)
    assert recommend(sig, POLICY, 2) == 3  # ceil(210 / (0.7 x 100))
    assert recommend(measure([alone(0, 700), alone(1, 700)], [], COST, replicas=2, desired=2), POLICY, 2) == 6  # max
    assert recommend(measure([alone(0, 0), alone(1, 0)], [], COST, replicas=2, desired=2), POLICY, 2) == 2  # min
    assert recommend(measure([], [], COST, replicas=3, desired=3), POLICY, 3) == 3  # nothing ready: hold


# --------------------------------------------------------------------------------------------- scale-up


def test_a_burst_drops_and_scales_out_in_the_same_round() -> None:
    pressures = [alone(0, 150, waiting=3, running=4), alone(1, 60, running=2)]
    rnd = decide_round(pressures, [], pool="p", model="m", spec=SPEC, cost=COST, now=100.0, low_since={},
                       policy=POLICY, scale=ScaleState(replicas=2))
    assert rnd.decision is not None and rnd.decision.action is Action.DROP
    assert rnd.decision.group.members == (name(0), name(1))
    assert rnd.scale is not None and rnd.scale.event is ScaleEvent.SCALE_UP
    assert rnd.scale.state == ScaleState(replicas=3, scale_up=ScaleUp(start=2, target=3, since=100.0, bridge=True),
                                         history=((100.0, 3),))
    assert (rnd.scale.signals.replicas, rnd.scale.signals.desired_replicas) == (3, 3)
    assert rnd.scale.reason == ("KV need 210 blocks is 1.05 of full capacity: 2 -> 3 replicas (a drop bridges the "
                                "start-up)")


def test_no_restore_before_the_new_replicas_are_ready() -> None:
    g = pair("g1", 0, 1)
    state = ScaleState(replicas=3, scale_up=ScaleUp(2, 3, 100.0, True))
    d = run([staged(0, "g1", 210, 150, waiting=1), staged(1, "g1", 210, 60)], [g], state, now=130.0)
    assert d.event is None and d.state.scale_up == state.scale_up and d.restores == ()
    assert d.state.replicas == 3


def test_ready_new_replicas_release_the_groups_least_pressure_left_first() -> None:
    g1, g2, g3 = pair("g1", 0, 1), pair("g2", 2, 3), pair("g3", 4, 5)
    pressures = [staged(0, "g1", 80, 60), staged(1, "g1", 80, 20),  # left with 0.6 and 0.2
                 staged(2, "g2", 40, 30), staged(3, "g2", 40, 10),  # left with 0.3 and 0.1
                 staged(4, "g3", 95, 95), staged(5, "g3", 95, 0),  # left with 0.95 >= drop: would drop again
                 alone(6, 0)]
    state = ScaleState(replicas=7, scale_up=ScaleUp(6, 7, 100.0, True), history=((110.0, 7),))
    policy = AutoscalePolicy(min_replicas=2, max_replicas=8, scale_down_window_s=60)
    d = run(pressures, [g1, g2, g3], state, now=160.0, policy=policy)
    assert d.event is ScaleEvent.READY and d.reason == "1 new replica(s) ready after 60.0 s"
    assert d.state.scale_up is None and d.state.release == ("g1", "g2", "g3")
    assert d.restores == ("g2", "g1")
    assert restore_order([g1, g2, g3], pressures, SPEC, COST) == ("g2", "g1")

    rnd = decide_round(pressures, [formed(g) for g in (g1, g2, g3)], pool="p", model="m", spec=SPEC, cost=COST,
                       now=160.0, low_since={}, policy=policy, scale=state)
    assert rnd.decision is not None and rnd.decision.action is Action.RESTORE
    assert rnd.decision.group.id == "g2"
    assert rnd.decision.reason == ("scale-out bridged: the new replicas serve, the group is left with demand 0.30 "
                                   "(< drop 0.9)")
    # Once g2 is gone, the next round restores g1 (release carries over), then g3 stays until its load falls.
    now_alone = [alone(2, 30), alone(3, 10)]
    later = run([p for p in pressures if p.group != "g2"] + now_alone, [g1, g3], d.state, now=161.0, policy=policy)
    assert later.event is None and later.restores == ("g1",) and later.state.release == ("g1", "g3")


def test_demand_falling_before_ready_cancels_the_scale_up_and_restores() -> None:
    g = pair("g1", 0, 1)
    state = ScaleState(replicas=4, scale_up=ScaleUp(2, 4, 100.0, True))
    d = run([staged(0, "g1", 30, 20), staged(1, "g1", 30, 10)], [g], state, now=120.0)
    assert d.event is ScaleEvent.CANCEL
    assert d.state.replicas == 2 and d.state.scale_up is None and d.state.release == ("g1",)
    assert d.restores == ("g1",)
    assert d.reason == "demand fell to 0.15 of full capacity before the new replicas were ready"


def test_a_scale_up_in_flight_extends_when_demand_keeps_growing() -> None:
    state = ScaleState(replicas=3, scale_up=ScaleUp(2, 3, 100.0, False))
    d = run([alone(0, 200, waiting=5), alone(1, 150, waiting=2)], [], state, now=105.0, dropping=True)
    assert d.event is ScaleEvent.SCALE_UP and d.state.replicas == 5  # ceil(350 / 70)
    assert d.state.scale_up == ScaleUp(2, 5, 100.0, True)


def test_scale_up_stabilisation_takes_the_lowest_recommendation_of_the_window() -> None:
    policy = AutoscalePolicy(min_replicas=2, max_replicas=6, scale_up_window_s=10, scale_down_window_s=60)
    hot = [alone(0, 150, waiting=3), alone(1, 60)]
    first = run([alone(0, 60), alone(1, 60)], [], ScaleState(replicas=2), now=0.0, policy=policy)
    second = run(hot, [], first.state, now=5.0, policy=policy)
    assert (second.recommendation, second.event, second.state.replicas) == (3, None, 2)
    third = run(hot, [], second.state, now=11.0, policy=policy)
    assert (third.event, third.state.replicas) == (ScaleEvent.SCALE_UP, 3)


def test_external_driver_takes_the_count_the_hpa_wrote() -> None:
    policy = AutoscalePolicy(min_replicas=2, max_replicas=6, driver=Driver.EXTERNAL)
    d = run([alone(0, 10), alone(1, 10)], [pair("g1", 0, 1)][:0], ScaleState(replicas=2), policy=policy, external=9)
    assert (d.recommendation, d.state.replicas, d.state.scale_up) == (6, 6, ScaleUp(2, 6, 100.0, False))


# ------------------------------------------------------------------------------------------- scale-down


def test_scale_down_drains_the_top_replica_then_removes_it_when_idle() -> None:
    quiet = [alone(0, 10), alone(1, 10), alone(2, 5, running=1), alone(3, 0)]
    state = ScaleState(replicas=4)
    d = run(quiet, [], state, now=100.0)
    assert d.recommendation == 2 and d.event is ScaleEvent.DRAIN
    assert d.state.draining == ((name(2), 100.0), (name(3), 100.0)) and d.state.replicas == 4
    assert d.reason == "draining p-agent-2, p-agent-3 (recommended 2)"
    # Next round: agent-3 is idle and goes; agent-2 still streams, so it stays (draining).
    d2 = run(quiet, [], d.state, now=101.0)
    assert d2.event is ScaleEvent.SCALE_DOWN and d2.state.replicas == 3
    assert d2.state.draining == ((name(2), 100.0),) and d2.reason == "removed drained p-agent-3: 3 replicas"
    # Its stream never ends: after drain_timeout_s it goes anyway (the gateway replays the stream).
    d3 = run(quiet[:3], [], d2.state, now=130.0)
    assert (d3.event, d3.state.replicas, d3.state.draining) == (ScaleEvent.SCALE_DOWN, 2, ())


def test_scale_down_never_removes_a_group_member_and_a_rising_recommendation_ends_the_drain() -> None:
    g = pair("g1", 2, 3)
    low = [alone(0, 0), alone(1, 0), staged(2, "g1", 0, 0), staged(3, "g1", 0, 0)]
    d = run(low, [g], ScaleState(replicas=4), now=100.0)
    assert (d.event, d.state.replicas, d.state.draining) == (None, 4, ())  # agent-3 holds the count
    draining = ScaleState(replicas=4, draining=((name(3), 90.0),))
    busy = [alone(0, 100), alone(1, 100), alone(2, 30), alone(3, 0)]
    d2 = run(busy, [], draining, now=100.0)
    assert d2.recommendation == 4 and d2.state.draining == () and d2.state.replicas == 4


def test_scale_down_stabilisation_keeps_the_highest_recommendation_of_the_window() -> None:
    state = ScaleState(replicas=3, history=((50.0, 3),))
    d = run([alone(0, 10), alone(1, 10), alone(2, 10)], [], state, now=100.0)
    assert (d.recommendation, d.event, d.state.draining) == (2, None, ())
    d2 = run([alone(0, 10), alone(1, 10), alone(2, 10)], [], state, now=111.0)
    assert d2.event is ScaleEvent.DRAIN and d2.state.draining_names == (name(2),)


# ------------------------------------------------------------------------------------------- the status


def test_state_survives_the_pools_status() -> None:
    pool = parse_pool({"metadata": {"name": "p", "namespace": "ns"},
                       "spec": {"model": {"name": "m", "path": "/m"}, "replicas": 2,
                                "elasticity": {"maxGroupSize": 2},
                                "autoscaling": {"minReplicas": 2, "maxReplicas": 6}}})
    assert state_from_status(pool, {}) == ScaleState(replicas=2)
    d = run([alone(0, 150, waiting=3), alone(1, 60)], [], ScaleState(replicas=2), dropping=True)
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    status = status_of(d, None, now)
    assert status == {"replicas": 3, "desiredReplicas": 3, "scaleUpFrom": 2, "scaleUpSince": 100.0, "bridge": True,
                      "release": None, "draining": None, "drainingSince": None, "demand": 1.05, "blocksNeeded": 210,
                      "blocksFullCapacity": 200, "blocksTotal": 200, "replicasDropped": 0, "waiting": 3,
                      "lastScaleTime": "2026-01-01T00:00:00Z", "message": d.reason}
    assert state_from_status(pool, {"autoscaling": status}) == ScaleState(replicas=3, scale_up=ScaleUp(2, 3, 100.0,
                                                                                                        True))
    metrics = PoolMetrics()
    metrics.observe("ns", "p", d.signals, "ScaleUp")
    get = metrics.registry.get_sample_value
    assert get("kunserve_pool_kv_demand_ratio", {"namespace": "ns", "pool": "p"}) == pytest.approx(1.05)
    assert get("kunserve_pool_desired_replicas", {"namespace": "ns", "pool": "p"}) == 3
    assert get("kunserve_pool_kv_blocks_needed", {"namespace": "ns", "pool": "p"}) == 210
    assert get("kunserve_pool_scale_events_total", {"namespace": "ns", "pool": "p", "event": "ScaleUp"}) == 1
