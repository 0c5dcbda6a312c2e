"""Property tests of plan_drops over random pools, a brute-force optimality check and a timing check."""

from __future__ import annotations

import itertools
import random
import time

from hypothesis import event, given, settings

from kunserve.operator.cost_model import CostModel
from kunserve.operator.plan_types import PoolSpec, ReplicaPressure
from kunserve.operator.planner import (
    deficit_tokens,
    effective_max_group_size,
    evaluate_group,
    is_pressured,
    plan_drops,
)
from tests.operator_unit.pools import MODELS, check_plans, random_pools


@settings(max_examples=150, deadline=None)
@given(random_pools())
def test_plans_are_well_formed(case: tuple[CostModel, PoolSpec, list[ReplicaPressure]]) -> None:
    """Stages cover every layer once in order; no replica twice; one model per group; size within bounds."""
    cost, spec, pressures = case
    plans = plan_drops(pressures, spec, cost)
    event(f"groups: {min(len(plans), 3)}{'+' if len(plans) >= 3 else ''}")
    event(f"uncovered group: {any(not p.covers_deficit for p in plans)}")
    check_plans(plans, pressures, spec, cost, effective_max_group_size(spec, cost))


@settings(max_examples=500, deadline=None)
@given(random_pools(max_n=6, equal_pools=True))
def test_first_leader_is_covered_whenever_some_group_covers_it(
    case: tuple[CostModel, PoolSpec, list[ReplicaPressure]],
) -> None:
    """Brute force over every group of free replicas that includes the model's largest-deficit replica:
    if one covers, the plan covers it with the smallest such group; if one gains, a plan exists."""
    cost, spec, pressures = case
    plans = plan_drops(pressures, spec, cost)
    max_size = effective_max_group_size(spec, cost)
    for model in MODELS:
        free = [p for p in pressures if p.model == model and not p.stale and p.group is None]
        leaders = sorted((p for p in free if is_pressured(p, spec)),
                         key=lambda p: (-deficit_tokens(p, cost), -p.demand, p.name))
        if not leaders:
            continue
        leader = leaders[0]
        others = [p for p in free if p.name != leader.name]
        covering_sizes, gains = [], []
        for k in range(1, min(max_size, len(others) + 1)):
            for combo in itertools.combinations(others, k):
                cand = evaluate_group([leader, *combo], spec, cost)
                gains.append(cand.gain)
                if cand.covers:
                    covering_sizes.append(k + 1)
        mine = [p for p in plans if leader.name in p.members]
        event("covered" if covering_sizes else "positive gain" if any(g > 0 for g in gains) else "no gain")
        if covering_sizes:
            event(f"smallest covering group: {min(covering_sizes)}")
            assert len(mine) == 1 and mine[0].covers_deficit
            assert len(mine[0].members) == min(covering_sizes)
        elif any(g > 0 for g in gains):
            assert len(mine) == 1 and not mine[0].covers_deficit
            assert mine[0].capacity_gain_tokens == max(gains)
        else:
            assert mine == []


def test_planner_is_fast_for_a_thousand_replicas() -> None:
    rng = random.Random(7)
    cost = CostModel(num_layers=32, layer_bytes=400_000_000, embed_bytes=500_000_000, head_bytes=500_000_000,
                     kv_bytes_per_token_layer=4096, block_size=16)
    pressures = []
    for i in range(1000):
        pool = rng.randrange(20, 60) * 1_000_000_000
        total = cost.block_capacity(pool)
        hot = rng.random() < 0.3
        pressures.append(ReplicaPressure(
            name=f"agent-{i}", model=f"model-{i % 2}", blocks_total=total,
            blocks_needed=int(total * (rng.uniform(1.0, 1.6) if hot else rng.uniform(0.0, 0.8))),
            num_waiting=rng.randrange(1, 20) if hot else 0, kv_pool_bytes=pool,
        ))
    started = time.perf_counter()
    plans = plan_drops(pressures, PoolSpec(max_group_size=8), cost)
    elapsed = time.perf_counter() - started
    print(f"plan_drops over 1000 replicas: {elapsed * 1e3:.1f} ms, {len(plans)} groups")
    check_plans(plans, pressures, PoolSpec(max_group_size=8), cost, 8)
    assert plans and elapsed < 2.0
