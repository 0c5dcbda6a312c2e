"""The planner: pressure of every replica + pool spec + cost model -> drop and restore plans (DESIGN §4).

Pure and deterministic: no I/O, no clock (the caller passes `now`), inputs are never mutated, ties are
broken by replica name. The same code runs in the operator, in local mode and in the simulator.

Drop (plan_drops), greedy O(N log N):
- only fresh (not stale), ungrouped replicas take part; a group never mixes models;
- a replica is *pressured* when demand >= drop_demand and it has a queue; any replica's deficit is
  max(0, blocks_needed - blocks_total) * block_size tokens (0 for a pressured replica still below 1.0);
- pressured replicas lead groups in order of deficit (largest first). A leader takes partners from the
  free replicas of its model in ascending demand (least loaded first) and grows the group from 2 to the
  maximum size until the capacity gain (group capacity - members' capacities alone) >= the sum of all
  members' deficits. Partners' spare blocks are not counted: they stay headroom for the group.
- a pressured replica may be a partner (only once no less-loaded replica is left, by the ordering): its
  deficit then joins the sum, so a covering group covers it too, and it never leads a group of its own.
- when no size covers, the size with the largest positive gain is formed (covers_deficit=False);
  when no size gains anything (e.g. stages of uneven length whose bottleneck holds fewer tokens than the
  members did alone), no group is formed and the leader stays free (a later leader may take it).
- the partners of a leader are the least-loaded free replicas, not searched further: with equal pools per
  model (the normal case: one ServingPool, one resource spec) this finds the smallest covering group for
  the first leader of each model; with unequal pools it is a heuristic.

Restore (plan_restores), with hysteresis: a Cooperative group restores when every member's split-back
demand has stayed < restore_demand with no queue for restore_window_s. The restore threshold is below
the drop threshold, so a group just formed for demand >= drop_demand never qualifies at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kunserve.operator.cost_model import CostModel, LayerRange
from kunserve.operator.plan_types import (
    ActiveGroup,
    GroupPhase,
    GroupPlan,
    PoolSpec,
    ReplicaPressure,
    RestorePlan,
    SplitPolicy,
    StagePlan,
)


def is_pressured(p: ReplicaPressure, spec: PoolSpec) -> bool:
    """Demand at or above the drop threshold with a non-empty queue."""
    return p.demand >= spec.drop_demand and p.num_waiting > 0


def deficit_tokens(p: ReplicaPressure, cost: CostModel) -> int:
    """Tokens the replica needs beyond its pool: max(0, blocks_needed - blocks_total) * block_size."""
    return max(p.blocks_needed - p.blocks_total, 0) * cost.block_size


def group_id_for(members: Iterable[str]) -> str:
    """Deterministic, DNS-1123-safe id from the sorted member names."""
    digest = hashlib.sha256(",".join(sorted(members)).encode()).hexdigest()
    return f"g-{digest[:10]}"


def effective_max_group_size(spec: PoolSpec, cost: CostModel) -> int:
    """max_group_size, capped by the layer count (a stage needs a layer) and by max_added_latency_s."""
    size = min(spec.max_group_size, cost.num_layers)
    if spec.max_added_latency_s is not None and cost.stage_latency_s > 0:
        size = min(size, 1 + int(spec.max_added_latency_s / cost.stage_latency_s + 1e-9))
    return size


def stage_split(spec: PoolSpec, cost: CostModel, pool_bytes: Sequence[int]) -> list[LayerRange]:
    """The layer ranges of a group whose stages (in order) have these pools, by the spec's policy."""
    if spec.split is SplitPolicy.EVEN:
        return cost.even_split(len(pool_bytes))
    return cost.balanced_split(pool_bytes)


@dataclass(slots=True, frozen=True)
class _Candidate:
    members: tuple[ReplicaPressure, ...]  # stage order (by name)
    split: tuple[LayerRange, ...]
    before: int
    after: int
    deficit: int

    @property
    def gain(self) -> int:
        return self.after - self.before

    @property
    def covers(self) -> bool:
        return self.gain >= self.deficit and self.gain > 0  # a group that gains nothing helps no one


def evaluate_group(members: Iterable[ReplicaPressure], spec: PoolSpec, cost: CostModel) -> _Candidate:
    """Capacities of the group these replicas would form (stages ordered by replica name)."""
    ordered = tuple(sorted(members, key=lambda p: p.name))
    pools = [p.kv_pool_bytes for p in ordered]
    split = tuple(stage_split(spec, cost, pools))
    return _Candidate(
        members=ordered,
        split=split,
        before=sum(cost.token_capacity(b) for b in pools),
        after=cost.group_capacity(pools, split),
        deficit=sum(deficit_tokens(p, cost) for p in ordered),
    )


class _FreeList:
    """Replicas of one model in ascending demand; taking one is O(α(N)) via a next-free forest."""

    def __init__(self, replicas: list[ReplicaPressure]) -> None:
        self.items = sorted(replicas, key=lambda p: (p.demand, p.blocks_needed, p.name))  # inf demands tie
        self.index = {p.name: i for i, p in enumerate(self.items)}
        self.next = list(range(len(self.items) + 1))  # next[i] == i: free (or the end sentinel)

    def _find(self, i: int) -> int:
        root = i
        while self.next[root] != root:
            root = self.next[root]
        while self.next[i] != root:
            self.next[i], i = root, self.next[i]
        return root

    def first(self, k: int, skip: str) -> list[ReplicaPressure]:
        """The k least-loaded free replicas other than `skip`."""
        out: list[ReplicaPressure] = []
        i = self._find(0)
        while i < len(self.items) and len(out) < k:
            if self.items[i].name != skip:
                out.append(self.items[i])
            i = self._find(i + 1)
        return out

    def take(self, name: str) -> None:
        i = self.index[name]
        self.next[i] = i + 1


def _choose(
    leader: ReplicaPressure, partners: list[ReplicaPressure], spec: PoolSpec, cost: CostModel
) -> _Candidate | None:
    """The smallest group that covers; else the one that gains most; None if none gains."""
    best: _Candidate | None = None
    for size in range(2, len(partners) + 2):
        cand = evaluate_group([leader, *partners[: size - 1]], spec, cost)
        if cand.covers:
            return cand
        if best is None or cand.gain > best.gain:
            best = cand
    return best if best is not None and best.gain > 0 else None


def _reason(leader: ReplicaPressure, cand: _Candidate, cost: CostModel) -> str:
    verdict = "covers it" if cand.covers else f"short by {cand.deficit - cand.gain}"
    return (
        f"{leader.name} demand {leader.demand:.2f} with {leader.num_waiting} waiting; members' deficit "
        f"{cand.deficit} tokens; {len(cand.members)} stages add {cand.gain} tokens ({verdict}), "
        f"+{cost.added_latency_s(len(cand.members)) * 1e3:.2f} ms/token"
    )


def _unique(pressures: Iterable[ReplicaPressure]) -> list[ReplicaPressure]:
    seen: set[str] = set()
    out = []
    for p in pressures:
        if p.name in seen:
            raise ValueError(f"replica {p.name!r} reported twice")
        seen.add(p.name)
        out.append(p)
    return out


def plan_drops(pressures: Iterable[ReplicaPressure], spec: PoolSpec, cost: CostModel) -> list[GroupPlan]:
    """The groups to form now (in the order they were decided: largest deficit first)."""
    eligible = [p for p in _unique(pressures) if not p.stale and p.group is None]
    max_size = effective_max_group_size(spec, cost)
    if max_size < 2:
        return []
    by_model: dict[str, list[ReplicaPressure]] = {}
    for p in eligible:
        by_model.setdefault(p.model, []).append(p)
    free = {model: _FreeList(replicas) for model, replicas in by_model.items()}
    leaders = sorted(
        (p for p in eligible if is_pressured(p, spec)), key=lambda p: (-deficit_tokens(p, cost), -p.demand, p.name)
    )
    taken: set[str] = set()
    plans: list[GroupPlan] = []
    for leader in leaders:
        if leader.name in taken:
            continue
        pool = free[leader.model]
        cand = _choose(leader, pool.first(max_size - 1, skip=leader.name), spec, cost)
        if cand is None:
            continue
        for p in cand.members:
            taken.add(p.name)
            pool.take(p.name)
        names = tuple(p.name for p in cand.members)
        plans.append(
            GroupPlan(
                group_id=group_id_for(names),
                model=leader.model,
                members=names,
                stages=tuple(StagePlan(n, a, b) for n, (a, b) in zip(names, cand.split, strict=True)),
                capacity_before_tokens=cand.before,
                capacity_after_tokens=cand.after,
                deficit_tokens=cand.deficit,
                covers_deficit=cand.covers,
                added_latency_s=cost.added_latency_s(len(names)),
                reason=_reason(leader, cand, cost),
                pressure=cand.members,
            )
        )
    return plans


def split_back_demands(group: ActiveGroup, members: Sequence[ReplicaPressure], cost: CostModel) -> tuple[float, ...]:
    """Each member's demand once the group splits back (members in stage order).

    Alone, a member's pool shrinks by what its stage freed. Its need is home_blocks_needed when every member
    reports it. Otherwise the planner cannot tell where the group's requests go home, so it assumes the worst:
    the group's whole need (the largest blocks_needed of a stage: every stage holds every request) lands on
    the smallest member. Averaging instead would let a group formed for one hot replica and idle partners
    look low at once, restore, and drop again: oscillation.
    """
    alone = [
        cost.block_capacity(p.kv_pool_bytes - cost.freed_bytes(s.layer_start, s.layer_end))
        for p, s in zip(members, group.stages, strict=True)
    ]

    def ratio(need: int, total: int) -> float:
        return need / total if total else (float("inf") if need else 0.0)

    homes = [p.home_blocks_needed for p in members]
    if all(h is not None for h in homes):
        return tuple(ratio(h or 0, a) for h, a in zip(homes, alone, strict=True))
    shared = ratio(max(p.blocks_needed for p in members), min(alone))
    return tuple(shared for _ in members)


def plan_restores(
    groups: Iterable[ActiveGroup],
    pressures: Iterable[ReplicaPressure],
    spec: PoolSpec,
    cost: CostModel,
    *,
    now: float,
    low_since: Mapping[str, float],
) -> tuple[list[RestorePlan], dict[str, float]]:
    """Restores due at `now`, and the new low_since map (group id -> when it became low) to carry.

    A group is low when every member reports fresh pressure, no member has a queue and every split-back
    demand is < restore_demand; low_since keeps the time it became low and is dropped as soon as it is not
    (a stale or missing member also resets it: a continuous window cannot be proven across a gap). Only
    Cooperative groups are considered; the returned map holds only groups that are low now.
    """
    by_name = {p.name: p for p in _unique(pressures)}
    plans: list[RestorePlan] = []
    carried: dict[str, float] = {}
    for group in groups:
        if group.phase is not GroupPhase.COOPERATIVE:
            continue
        members = [by_name.get(n) for n in group.members]
        fresh = [p for p in members if p is not None and not p.stale]
        if len(fresh) != len(members):
            continue
        demands = split_back_demands(group, fresh, cost)
        if any(p.num_waiting > 0 for p in fresh) or max(demands) >= spec.restore_demand:
            continue
        since = low_since.get(group.group_id, now)
        carried[group.group_id] = since
        if now - since >= spec.restore_window_s:
            plans.append(
                RestorePlan(
                    group_id=group.group_id,
                    model=group.model,
                    members=group.members,
                    stages=group.stages,
                    split_back_demand=demands,
                    low_since=since,
                    reason=(
                        f"split-back demand <= {max(demands):.2f} (< {spec.restore_demand}) with no queue "
                        f"for {now - since:.1f} s (window {spec.restore_window_s} s)"
                    ),
                    pressure=tuple(fresh),
                )
            )
    return plans, carried
