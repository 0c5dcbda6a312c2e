"""plan_drops: exact plans for hand-worked pools (numbers in pools.py) and the rules around them."""

from __future__ import annotations

import dataclasses

import pytest

from kunserve.operator.cost_model import CostModel
from kunserve.operator.plan_types import GroupPlan, PoolSpec, SplitPolicy, StagePlan
from kunserve.operator.planner import (
    deficit_tokens,
    effective_max_group_size,
    group_id_for,
    is_pressured,
    plan_drops,
)
from tests.operator_unit.pools import HAND, rep

SPEC = PoolSpec()


def _stages(*triples: tuple[str, int, int]) -> tuple[StagePlan, ...]:
    return tuple(StagePlan(*t) for t in triples)


def test_pressure_and_deficit() -> None:
    assert is_pressured(rep("a", 90, 1), SPEC)
    assert not is_pressured(rep("a", 89, 1), SPEC)  # demand 0.89 < 0.9
    assert not is_pressured(rep("a", 150, 0), SPEC)  # no queue
    assert deficit_tokens(rep("a", 150, 3), HAND) == 100  # (150 - 100) blocks * 2 tokens
    assert deficit_tokens(rep("a", 95, 3), HAND) == 0
    assert rep("a", 1, total=0).demand == float("inf") and rep("a", 0, total=0).demand == 0.0


def test_group_of_two_exactly_covers() -> None:
    # a2: deficit 100 tokens; a group of 2 gains exactly 100. Partner: the least loaded, a0 (demand 0.1).
    pressures = [rep("a0", 10), rep("a1", 50), rep("a2", 150, 3), rep("a3", 30)]
    plans = plan_drops(pressures, SPEC, HAND)
    assert plans == [
        GroupPlan(
            group_id=group_id_for(["a2", "a0"]),
            model="m",
            members=("a0", "a2"),
            stages=_stages(("a0", 0, 2), ("a2", 2, 4)),
            capacity_before_tokens=400,
            capacity_after_tokens=500,
            deficit_tokens=100,
            covers_deficit=True,
            added_latency_s=HAND.stage_latency_s,
            reason=plans[0].reason,
            pressure=(pressures[0], pressures[2]),
        )
    ]
    assert plans[0].capacity_gain_tokens == 100
    assert "a2 demand 1.50 with 3 waiting" in plans[0].reason and "covers it" in plans[0].reason
    assert plans[0].to_dict()["stages"] == [
        {"replica": "a0", "layerStart": 0, "layerEnd": 2},
        {"replica": "a2", "layerStart": 2, "layerEnd": 4},
    ]


def test_one_token_block_more_needs_four_since_three_uneven_stages_lose() -> None:
    # deficit 102 > 100 (size 2); size 3 splits 2+1+1 and gains -100; size 4 gains 300.
    pressures = [rep("a0", 10), rep("a1", 50), rep("a2", 151, 3), rep("a3", 30)]
    (plan,) = plan_drops(pressures, SPEC, HAND)
    assert plan.members == ("a0", "a1", "a2", "a3")
    assert plan.stages == _stages(("a0", 0, 1), ("a1", 1, 2), ("a2", 2, 3), ("a3", 3, 4))
    assert (plan.capacity_before_tokens, plan.capacity_after_tokens, plan.deficit_tokens) == (800, 1100, 102)
    assert plan.covers_deficit


def test_uncoverable_deficit_still_forms_the_group_that_gains_most() -> None:
    pressures = [rep("a0", 10), rep("a1", 50), rep("a2", 252, 9), rep("a3", 30)]
    (plan,) = plan_drops(pressures, SPEC, HAND)  # deficit 304 > 300, the most any group gains
    assert plan.members == ("a0", "a1", "a2", "a3") and not plan.covers_deficit
    assert plan.capacity_gain_tokens == 300 and "short by 4" in plan.reason
    # capped at 3: size 2 gains 100, size 3 gains -100 -> the pair
    (plan,) = plan_drops(pressures, dataclasses.replace(SPEC, max_group_size=3), HAND)
    assert plan.members == ("a0", "a2") and plan.capacity_gain_tokens == 100 and not plan.covers_deficit


def test_max_group_size_respected() -> None:
    pressures = [rep("a0", 10), rep("a1", 50), rep("a2", 151, 3), rep("a3", 30)]
    (plan,) = plan_drops(pressures, dataclasses.replace(SPEC, max_group_size=2), HAND)
    assert plan.members == ("a0", "a2") and not plan.covers_deficit and plan.deficit_tokens == 102


def test_no_group_when_no_size_gains() -> None:
    # L=3: a full block is 2 * 3 * 10 = 60 B, so 8000 B hold 133 blocks = 266 tokens alone.
    # A pair splits 2+1; the 2-layer stage holds (8000 + 1000) // 40 = 225 blocks = 450 tokens < 532: no gain.
    # Three 1-layer stages hold (8000 + 2000) // 20 = 500 blocks = 1000 tokens each: gain 1000 - 798 = 202.
    cost = dataclasses.replace(HAND, num_layers=3)
    pair = [rep("a0", 10, total=133), rep("a1", 200, 4, total=133)]  # deficit 67 * 2 = 134 tokens
    assert plan_drops(pair, SPEC, cost) == []
    (plan,) = plan_drops([*pair, rep("a2", 20, total=133)], SPEC, cost)
    assert plan.members == ("a0", "a1", "a2") and plan.capacity_gain_tokens == 202 and plan.covers_deficit
    assert plan.stages == _stages(("a0", 0, 1), ("a1", 1, 2), ("a2", 2, 3))


def test_models_never_mix() -> None:
    pressures = [rep("x0", 150, 3, model="x"), rep("y0", 0, model="y"), rep("y1", 0, model="y")]
    assert plan_drops(pressures, SPEC, HAND) == []
    pressures.append(rep("x1", 70, model="x"))
    (plan,) = plan_drops(pressures, SPEC, HAND)
    assert plan.members == ("x0", "x1") and plan.model == "x"


def test_stale_and_grouped_replicas_are_ignored() -> None:
    pressures = [rep("a0", 0, stale=True), rep("a1", 0, group="g-1"), rep("a2", 150, 3), rep("a3", 60)]
    (plan,) = plan_drops(pressures, SPEC, HAND)
    assert plan.members == ("a2", "a3")
    assert plan_drops([rep("a0", 0), rep("a2", 150, 3, stale=True)], SPEC, HAND) == []
    assert plan_drops([rep("a0", 0), rep("a2", 150, 3, group="g-2")], SPEC, HAND) == []


def test_pressured_replicas_partner_each_other_and_their_deficits_add_up() -> None:
    # Burst on both: deficits 40 + 40 = 80 <= 100 -> one covering pair, a0 leads (tie broken by name).
    (plan,) = plan_drops([rep("a1", 120, 2), rep("a0", 120, 2)], SPEC, HAND)
    assert plan.members == ("a0", "a1") and plan.deficit_tokens == 80 and plan.covers_deficit
    # 60 + 60 > 100: still grouped (it helps both), marked not covering
    (plan,) = plan_drops([rep("a1", 130, 2), rep("a0", 130, 2)], SPEC, HAND)
    assert plan.deficit_tokens == 120 and not plan.covers_deficit


def test_largest_deficit_leads_and_takes_the_least_loaded_partner() -> None:
    pressures = [rep("p1", 110, 1), rep("p0", 150, 5), rep("idle", 5), rep("busy", 80)]
    plans = plan_drops(pressures, SPEC, HAND)
    assert [p.members for p in plans] == [("idle", "p0"), ("busy", "p1")]
    assert [p.covers_deficit for p in plans] == [True, True]


def test_fewest_groups_a_pressured_partner_is_covered_by_the_leaders_group() -> None:
    # no idle replica: p0 (deficit 60) takes p1 (deficit 20): 80 <= 100, p1 needs no group of its own
    plans = plan_drops([rep("p0", 130, 1), rep("p1", 110, 1), rep("p2", 105, 1)], SPEC, HAND)
    assert [p.members for p in plans] == [("p0", "p2")]  # p2 (demand 1.05) is less loaded than p1 (1.10)


def test_even_policy_and_the_30_layer_split() -> None:
    cost = CostModel(num_layers=30, layer_bytes=1000, embed_bytes=5000, head_bytes=5000, kv_bytes_per_token_layer=1,
                     block_size=1)
    pool = 30_000  # 1000 tokens alone
    spec = dataclasses.replace(SPEC, split=SplitPolicy.EVEN)
    pressures = [rep(f"r{i}", 0, pool=pool, total=1000) for i in range(3)]
    pressures.append(rep("r3", 10_000, 1, pool=pool, total=1000))
    (plan,) = plan_drops(pressures, spec, cost)
    assert plan.stages == _stages(("r0", 0, 8), ("r1", 8, 16), ("r2", 16, 23), ("r3", 23, 30))
    # full 40000 B; stage 0 of 8 layers keeps 13000 B: (30000 + 27000) // 8 = 7125 tokens, the bottleneck
    assert (plan.capacity_before_tokens, plan.capacity_after_tokens, plan.covers_deficit) == (4000, 7125, False)
    # balanced: the embed/head stages take 7 layers, the middle ones 8: min(58000 // 7, 62000 // 8) = 7750
    (balanced,) = plan_drops(pressures, SPEC, cost)
    assert balanced.stages == _stages(("r0", 0, 7), ("r1", 7, 15), ("r2", 15, 23), ("r3", 23, 30))
    assert balanced.capacity_after_tokens == 7750


def test_latency_budget_caps_group_size() -> None:
    cost = dataclasses.replace(HAND, stage_latency_s=0.001)
    spec = dataclasses.replace(SPEC, max_added_latency_s=0.002)
    assert effective_max_group_size(spec, cost) == 3
    assert effective_max_group_size(SPEC, dataclasses.replace(HAND, num_layers=2)) == 2
    pressures = [rep("a0", 10), rep("a1", 50), rep("a2", 151, 3), rep("a3", 30)]
    (plan,) = plan_drops(pressures, spec, cost)
    assert plan.members == ("a0", "a2")  # size 4 would cover, but adds 3 ms per token


def test_plan_is_deterministic_and_rejects_duplicates() -> None:
    pressures = [rep("a0", 10), rep("a1", 50), rep("a2", 150, 3), rep("a3", 30)]
    assert plan_drops(pressures, SPEC, HAND) == plan_drops(list(reversed(pressures)), SPEC, HAND)
    assert group_id_for(["b", "a"]) == group_id_for(["a", "b"]) != group_id_for(["a", "c"])
    with pytest.raises(ValueError, match="twice"):
        plan_drops([rep("a0", 1), rep("a0", 2)], SPEC, HAND)


def test_pool_spec_validation() -> None:
    with pytest.raises(ValueError, match="hysteresis"):
        PoolSpec(drop_demand=0.5, restore_demand=0.5)
    with pytest.raises(ValueError):
        PoolSpec(max_group_size=1)
    with pytest.raises(ValueError):
        PoolSpec(restore_window_s=-1)
    with pytest.raises(ValueError):
        rep("a", -1)
