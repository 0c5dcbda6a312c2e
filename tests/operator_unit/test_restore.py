"""plan_restores: hysteresis with exact timestamps, split-back demand, and no drop/restore oscillation."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings

from kunserve.operator.cost_model import CostModel
from kunserve.operator.plan_types import ActiveGroup, GroupPhase, PoolSpec, ReplicaPressure, StagePlan
from kunserve.operator.planner import plan_drops, plan_restores, split_back_demands
from tests.operator_unit.pools import HAND, random_pools, rep

SPEC = PoolSpec()  # restore below 0.5 for 30 s
GID = "g-test"
# The pair of test_group_of_two_exactly_covers after its drop: each stage's pool grew 8000 -> 10000 B,
# 250 blocks of 2 layers; alone again each shrinks back to 8000 B = 100 blocks.
GROUP = ActiveGroup(GID, "m", (StagePlan("a0", 0, 2), StagePlan("a2", 2, 4)))


def grouped(name: str, needed: int, waiting: int = 0, *, home: int | None = None, stale: bool = False
            ) -> ReplicaPressure:
    return rep(name, needed, waiting, pool=10_000, total=250, group=GID, home=home, stale=stale)


def low(home0: int = 10, home2: int = 40) -> list[ReplicaPressure]:
    """Split-back demands 0.10 and 0.40 (< 0.5), no queue."""
    return [grouped("a0", home0 + home2, home=home0), grouped("a2", home0 + home2, home=home2)]


def restores(pressures: list[ReplicaPressure], now: float, since: dict[str, float], spec: PoolSpec = SPEC
             ) -> tuple[list[str], dict[str, float]]:
    plans, carried = plan_restores([GROUP], pressures, spec, HAND, now=now, low_since=since)
    return [p.group_id for p in plans], carried


def test_split_back_demand() -> None:
    assert split_back_demands(GROUP, low(), HAND) == (0.10, 0.40)
    # without home figures: the group's whole need on the smallest member, 50 / 100 for both
    assert split_back_demands(GROUP, [grouped("a0", 50), grouped("a2", 50)], HAND) == (0.5, 0.5)


def test_restore_after_the_window_exactly() -> None:
    since: dict[str, float] = {}
    assert restores(low(), 100.0, since) == ([], {GID: 100.0})
    assert restores(low(), 110.0, {GID: 100.0}) == ([], {GID: 100.0})
    assert restores(low(), 129.999, {GID: 100.0}) == ([], {GID: 100.0})
    ids, carried = restores(low(), 130.0, {GID: 100.0})
    assert ids == [GID] and carried == {GID: 100.0}
    (plan,) = plan_restores([GROUP], low(), SPEC, HAND, now=130.0, low_since={GID: 100.0})[0]
    assert plan.members == ("a0", "a2") and plan.stages == GROUP.stages
    assert plan.split_back_demand == (0.10, 0.40) and plan.low_since == 100.0
    assert "for 30.0 s" in plan.reason
    assert since == {}  # pure: the input map is never touched


def test_a_queue_or_a_high_member_restarts_the_window() -> None:
    carried = restores(low(), 100.0, {})[1]
    queued = [grouped("a0", 50, home=10), grouped("a2", 50, 1, home=40)]
    assert restores(queued, 115.0, carried) == ([], {})
    carried = restores(low(), 120.0, {})[1]
    assert restores(low(), 130.0, carried) == ([], {GID: 120.0})
    assert restores(low(home2=50), 140.0, carried) == ([], {})  # 50 / 100 is not below 0.5
    assert restores(low(), 150.0, {}) == ([], {GID: 150.0})
    assert restores(low(), 180.0, {GID: 150.0})[0] == [GID]


def test_stale_or_missing_member_blocks_and_resets() -> None:
    pressures = [grouped("a0", 50, home=10), grouped("a2", 50, home=40, stale=True)]
    assert restores(pressures, 200.0, {GID: 100.0}) == ([], {})
    assert restores(pressures[:1], 200.0, {GID: 100.0}) == ([], {})


def test_only_cooperative_groups_restore_and_vanished_groups_are_dropped() -> None:
    for phase in (GroupPhase.DROPPING, GroupPhase.RESTORING):
        group = dataclasses.replace(GROUP, phase=phase)
        assert plan_restores([group], low(), SPEC, HAND, now=500.0, low_since={GID: 0.0}) == ([], {})
    assert plan_restores([], low(), SPEC, HAND, now=500.0, low_since={GID: 0.0}) == ([], {})


def test_zero_window_restores_at_once_when_low() -> None:
    assert restores(low(), 7.0, {}, dataclasses.replace(SPEC, restore_window_s=0))[0] == [GID]


def test_a_group_just_dropped_does_not_restore() -> None:
    # The drop of test_group_of_two_exactly_covers: a2 at demand 1.5 with 3 waiting, a0 at 0.1.
    before = [rep("a0", 10), rep("a1", 50), rep("a2", 150, 3), rep("a3", 30)]
    (plan,) = plan_drops(before, SPEC, HAND)
    group = ActiveGroup.from_plan(plan)
    spec = dataclasses.replace(SPEC, restore_window_s=0)
    # right after the commit the queue is admitted (the group holds 250 blocks, 160 needed) ...
    after = [grouped("a0", 160, home=10), grouped("a2", 160, home=150)]
    assert split_back_demands(group, after, HAND) == (0.1, 1.5)
    assert plan_restores([group], after, spec, HAND, now=1.0, low_since={})[0] == []
    # ... and without home figures the conservative split-back keeps it too
    blind = [grouped("a0", 160), grouped("a2", 160)]
    assert plan_restores([group], blind, spec, HAND, now=1.0, low_since={})[0] == []
    # demand falling to just below the drop threshold is nowhere near low
    cooling = [grouped("a0", 99, home=10), grouped("a2", 99, home=89)]
    assert plan_restores([group], cooling, spec, HAND, now=2.0, low_since={})[0] == []


def _after_drop(members: tuple[ReplicaPressure, ...], stages: tuple[StagePlan, ...], cost: CostModel,
                with_home: bool) -> list[ReplicaPressure]:
    """What the members report right after the commit, with the queue admitted."""
    need = sum(p.blocks_needed for p in members)
    out = []
    for p, s in zip(members, stages, strict=True):
        pool = p.kv_pool_bytes + cost.freed_bytes(s.layer_start, s.layer_end)
        out.append(dataclasses.replace(
            p, blocks_needed=need, blocks_total=cost.block_capacity(pool, s.num_layers), kv_pool_bytes=pool,
            num_waiting=0, group="g", home_blocks_needed=p.blocks_needed if with_home else None,
        ))
    return out


@settings(max_examples=100, deadline=None)
@given(random_pools(max_n=24))
def test_no_group_qualifies_for_restore_right_after_its_drop(
    case: tuple[CostModel, PoolSpec, list[ReplicaPressure]],
) -> None:
    """Even with a zero window and the queue drained, the leader's split-back demand is >= drop_demand."""
    cost, spec, pressures = case
    spec = dataclasses.replace(spec, restore_window_s=0.0)
    plans = plan_drops(pressures, spec, cost)
    groups = [ActiveGroup.from_plan(p) for p in plans]
    for with_home in (True, False):
        after = [q for p in plans for q in _after_drop(p.pressure, p.stages, cost, with_home)]
        assert plan_restores(groups, after, spec, cost, now=0.0, low_since={}) == ([], {})
