"""Helpers shared by the planner tests: a hand-worked cost model, replica builders, a plan checker."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st

from kunserve.operator.cost_model import CostModel
from kunserve.operator.plan_types import GroupPlan, PoolSpec, ReplicaPressure, SplitPolicy

# L = 4 layers of 1000 B, no embed/head bytes, 10 B of KV per token per layer, blocks of 2 tokens.
# A full replica: 80 B per block. Pool 8000 B = 100 blocks = 200 tokens.
# Group of 2 (layers 2+2): each stage frees 2000 B -> 10000 B / 40 B per block = 250 blocks = 500 tokens;
#   gain 500 - 2 * 200 = 100 tokens.
# Group of 3 (layers 2+1+1): the 2-layer stage is the bottleneck: 500 tokens; gain 500 - 600 = -100.
# Group of 4 (1 layer each): 11000 B / 20 B = 550 blocks = 1100 tokens; gain 1100 - 800 = 300.
HAND = CostModel(num_layers=4, layer_bytes=1000, embed_bytes=0, head_bytes=0, kv_bytes_per_token_layer=10, block_size=2)
POOL = 8000
BLOCKS = 100


def rep(
    name: str,
    needed: int,
    waiting: int = 0,
    *,
    model: str = "m",
    pool: int = POOL,
    total: int = BLOCKS,
    stale: bool = False,
    group: str | None = None,
    home: int | None = None,
) -> ReplicaPressure:
    """A replica with blocks_needed=needed and the hand pool (100 blocks, 8000 B) unless told otherwise."""
    return ReplicaPressure(
        name=name,
        model=model,
        blocks_needed=needed,
        blocks_total=total,
        num_waiting=waiting,
        num_running=min(needed, 5),
        kv_pool_bytes=pool,
        stale=stale,
        group=group,
        home_blocks_needed=home,
    )


def check_plans(plans: Sequence[GroupPlan], pressures: Sequence[ReplicaPressure], spec: PoolSpec, cost: CostModel,
                max_size: int) -> None:
    """The structural invariants every drop plan must satisfy."""
    by_name = {p.name: p for p in pressures}
    seen: set[str] = set()
    for plan in plans:
        assert 2 <= len(plan.members) <= max_size
        assert plan.members == tuple(sorted(plan.members))
        assert tuple(s.replica for s in plan.stages) == plan.members
        expected = 0
        for stage in plan.stages:  # every layer exactly once, in order
            assert stage.layer_start == expected and stage.layer_end > stage.layer_start
            expected = stage.layer_end
        assert expected == cost.num_layers
        for name in plan.members:
            assert name not in seen, f"{name} in two groups"
            seen.add(name)
            p = by_name[name]
            assert p.model == plan.model and not p.stale and p.group is None
        assert any(p.demand >= spec.drop_demand and p.num_waiting > 0 for p in plan.pressure)
        pools = [by_name[n].kv_pool_bytes for n in plan.members]
        split = [(s.layer_start, s.layer_end) for s in plan.stages]
        assert plan.capacity_after_tokens == cost.group_capacity(pools, split)
        assert plan.capacity_before_tokens == sum(cost.token_capacity(b) for b in pools)
        assert plan.capacity_gain_tokens > 0
        assert plan.covers_deficit == (plan.capacity_gain_tokens >= plan.deficit_tokens)  # gain > 0 above


# ---- hypothesis strategies -------------------------------------------------------------------------------
MODELS = ("m0", "m1", "m2")


@st.composite
def costs(draw: st.DrawFn) -> CostModel:
    tied = draw(st.booleans())
    embed = draw(st.integers(0, 40_000))
    return CostModel(
        num_layers=draw(st.integers(2, 40)),
        layer_bytes=draw(st.integers(1, 20_000)),
        embed_bytes=embed,
        head_bytes=embed + 100 if tied else draw(st.integers(0, 40_000)),
        kv_bytes_per_token_layer=draw(st.integers(1, 32)),
        block_size=draw(st.sampled_from([1, 2, 16])),
        tied_embeddings=tied,
    )


@st.composite
def specs(draw: st.DrawFn) -> PoolSpec:
    return PoolSpec(
        drop_demand=draw(st.sampled_from([0.8, 0.9, 1.0])),
        restore_demand=0.5,
        max_group_size=draw(st.integers(2, 6)),
        split=draw(st.sampled_from(list(SplitPolicy))),
    )


def _replica(draw: st.DrawFn, i: int, cost: CostModel, models: int, pool: int | None) -> ReplicaPressure:
    kv_pool = pool if pool is not None else draw(st.integers(0, 60 * cost.layer_bytes + 200_000))
    total = cost.block_capacity(kv_pool)
    weight_blocks = cost.block_capacity(cost.full_weight_bytes)
    return ReplicaPressure(
        name=f"r{i:03d}",
        model=MODELS[draw(st.integers(0, models - 1))],
        # either anything, or an overflow of the order of what dropping frees (so group sizes matter)
        blocks_needed=draw(st.integers(0, 2 * total + 5) | st.integers(total, total + 2 * weight_blocks)),
        blocks_total=total,
        num_waiting=draw(st.sampled_from([0, 0, 1, 4])),
        num_running=draw(st.integers(0, 8)),
        kv_pool_bytes=kv_pool,
        stale=draw(st.integers(0, 9)) == 0,
        group="g-x" if draw(st.integers(0, 9)) == 0 else None,
    )


@st.composite
def random_pools(
    draw: st.DrawFn, max_n: int = 64, equal_pools: bool = False
) -> tuple[CostModel, PoolSpec, list[ReplicaPressure]]:
    """A random cost model, spec and pool of up to max_n replicas of 1-3 models (some stale or grouped)."""
    cost, spec = draw(costs()), draw(specs())
    models = draw(st.integers(1, 3))
    pool = draw(st.integers(1, 60 * cost.layer_bytes + 200_000)) if equal_pools else None
    n = draw(st.integers(0, max_n))
    return cost, spec, [_replica(draw, i, cost, models, pool) for i in range(n)]
