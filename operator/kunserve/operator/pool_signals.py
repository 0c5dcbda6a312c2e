"""Autoscaler-safe signals of a pool, measured against the replicas' *full* (no-drop) KV capacity (pure).

A drop grows a group's KV pool, so `blocks needed / blocks the pools have now` falls the moment a group forms
although no request went away. An autoscaler reading that ratio would see load fall in the middle of a burst
and scale in. These signals never move with a drop:

- blocks_needed: raw KV blocks the pool's requests need (running + waiting), every request counted once: a
  group's requests occupy every stage, so a group counts its members' home needs (or, when a member cannot
  tell, the largest stage need once);
- blocks_full: the blocks the ready replicas would hold with every layer (a group member's pool minus what its
  stage freed, exactly what it returns to on restore);
- demand = blocks_needed / blocks_full; blocks_total: the pools as they are now (grown by drops), for the
  curious; replicas_dropped: replicas serving in a group.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kunserve.operator.cost_model import CostModel
from kunserve.operator.plan_types import ActiveGroup, ReplicaPressure, StagePlan


@dataclass(slots=True, frozen=True)
class PoolSignals:
    replicas: int  # replicas the workload has (pods / agent processes asked for)
    ready_replicas: int  # replicas that report fresh pressure (weights loaded, serving)
    desired_replicas: int  # what the autoscaler wants
    blocks_needed: int
    blocks_full: int
    blocks_total: int
    replicas_dropped: int
    num_waiting: int
    num_running: int

    @property
    def demand(self) -> float:
        """blocks_needed / blocks_full: 0 when idle, inf when nothing is ready but blocks are needed."""
        if self.blocks_full == 0:
            return math.inf if self.blocks_needed else 0.0
        return self.blocks_needed / self.blocks_full

    def to_status(self) -> dict[str, Any]:
        demand = self.demand
        return {"demand": round(demand, 4) if math.isfinite(demand) else None, "blocksNeeded": self.blocks_needed,
                "blocksFullCapacity": self.blocks_full, "blocksTotal": self.blocks_total,
                "replicasDropped": self.replicas_dropped, "waiting": self.num_waiting}


def full_blocks(p: ReplicaPressure, stage: StagePlan | None, cost: CostModel) -> int:
    """Blocks the replica holds with every layer: its pool now, less what its stage freed (0 freed alone)."""
    if stage is None:
        return p.blocks_total
    return cost.block_capacity(p.kv_pool_bytes - cost.freed_bytes(stage.layer_start, stage.layer_end))


def group_need(members: Sequence[ReplicaPressure]) -> int:
    """Blocks a group's requests need, each request once (home needs when every member reports them)."""
    homes = [p.home_blocks_needed for p in members]
    if homes and all(h is not None for h in homes):
        return sum(h or 0 for h in homes)
    return max((p.blocks_needed for p in members), default=0)


def measure(pressures: Iterable[ReplicaPressure], groups: Sequence[ActiveGroup], cost: CostModel, *,
            replicas: int, desired: int) -> PoolSignals:
    """The signals over the fresh pressures (stale replicas are not ready and count for nothing)."""
    fresh = {p.name: p for p in pressures if not p.stale}
    stage_of = {s.replica: s for g in groups for s in g.stages}
    need = full = total = waiting = running = 0
    for p in fresh.values():
        full += full_blocks(p, stage_of.get(p.name), cost)
        total += p.blocks_total
        waiting += p.num_waiting
        running += p.num_running
        if p.name not in stage_of:
            need += p.blocks_needed
    dropped = 0
    for g in groups:
        members = [fresh[m] for m in g.members if m in fresh]
        need += group_need(members)
        dropped += len(members)
    return PoolSignals(replicas=replicas, ready_replicas=len(fresh), desired_replicas=desired, blocks_needed=need,
                       blocks_full=full, blocks_total=total, replicas_dropped=dropped, num_waiting=waiting,
                       num_running=running)
