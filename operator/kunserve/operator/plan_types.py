"""Data the planner consumes and produces: replica pressure, pool thresholds, drop and restore plans.

Everything here is an immutable value (frozen dataclasses, tuples) so a plan can be logged, compared in
tests and copied into a Reconfiguration resource without defensive copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class GroupPhase(StrEnum):
    """Where a group of replicas stands in its lifecycle (DESIGN §4); SERVING replicas form no group."""

    DROPPING = "Dropping"
    COOPERATIVE = "Cooperative"
    RESTORING = "Restoring"


class SplitPolicy(StrEnum):
    """How a group's layers are split into stages."""

    EVEN = "Even"  # L // g layers each, the first L % g stages one more
    BALANCED = "Balanced"  # maximise the group's KV capacity (first/last stages also hold embed / head)


@dataclass(slots=True, frozen=True)
class ReplicaPressure:
    """One replica's KV pressure as its agent last reported it.

    blocks_needed: blocks the running + waiting requests need (a block is block_size tokens, whatever the
    number of layers held); blocks_total: blocks the replica's pool has now; kv_pool_bytes: the pool's size
    in bytes now (grown while the replica is a stage of a group). group: the group id it belongs to, None
    while it serves alone. home_blocks_needed: only meaningful in a group, the blocks needed by the requests
    whose home is this replica (what it keeps when the group splits back); None if the agent cannot tell.
    """

    name: str
    model: str
    blocks_needed: int
    blocks_total: int
    num_waiting: int = 0
    num_running: int = 0
    kv_pool_bytes: int = 0
    stale: bool = False
    group: str | None = None
    home_blocks_needed: int | None = None

    def __post_init__(self) -> None:
        for field_name in ("blocks_needed", "blocks_total", "num_waiting", "num_running", "kv_pool_bytes"):
            if getattr(self, field_name) < 0:
                raise ValueError(f"replica {self.name!r}: {field_name} must be >= 0")
        if self.home_blocks_needed is not None and self.home_blocks_needed < 0:
            raise ValueError(f"replica {self.name!r}: home_blocks_needed must be >= 0")

    @property
    def demand(self) -> float:
        """blocks_needed / blocks_total (may exceed 1; inf when the pool is empty but blocks are needed)."""
        if self.blocks_total == 0:
            return math.inf if self.blocks_needed else 0.0
        return self.blocks_needed / self.blocks_total

    def to_dict(self) -> dict[str, Any]:
        demand = self.demand
        return {
            "replica": self.name,
            "demand": round(demand, 4) if math.isfinite(demand) else None,
            "blocksNeeded": self.blocks_needed,
            "blocksTotal": self.blocks_total,
            "numWaiting": self.num_waiting,
            "numRunning": self.num_running,
        }


@dataclass(slots=True, frozen=True)
class PoolSpec:
    """Elasticity thresholds of a ServingPool.

    A replica drops when demand >= drop_demand and it has a queue; a group restores when every member's
    split-back demand has stayed below restore_demand, with no queue, for restore_window_s. max_added_latency_s
    (optional) caps the group size so that (g - 1) * stage latency stays within it.
    """

    drop_demand: float = 0.9
    restore_demand: float = 0.5
    restore_window_s: float = 30.0
    max_group_size: int = 4
    split: SplitPolicy = SplitPolicy.BALANCED
    max_added_latency_s: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.restore_demand < self.drop_demand:
            raise ValueError(
                f"need 0 < restore_demand < drop_demand (hysteresis), got {self.restore_demand} and {self.drop_demand}"
            )
        if self.restore_window_s < 0:
            raise ValueError(f"restore_window_s must be >= 0, got {self.restore_window_s}")
        if self.max_group_size < 2:
            raise ValueError(f"max_group_size must be >= 2, got {self.max_group_size}")
        if self.max_added_latency_s is not None and self.max_added_latency_s < 0:
            raise ValueError(f"max_added_latency_s must be >= 0, got {self.max_added_latency_s}")


@dataclass(slots=True, frozen=True)
class StagePlan:
    """Replica `replica` keeps decoder layers [layer_start, layer_end) of the group's pipeline."""

    replica: str
    layer_start: int
    layer_end: int

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    def to_dict(self) -> dict[str, Any]:
        return {"replica": self.replica, "layerStart": self.layer_start, "layerEnd": self.layer_end}


@dataclass(slots=True, frozen=True)
class GroupPlan:
    """A drop: `members` form one pipeline whose `stages` cover [0, L) once, in order.

    Capacities are in tokens: before = the members' pools serving alone, after = the group's pool (a request
    occupies every stage, so it is the minimum over stages). covers_deficit: capacity_gain_tokens >=
    deficit_tokens (the members' summed deficits).
    """

    group_id: str
    model: str
    members: tuple[str, ...]
    stages: tuple[StagePlan, ...]
    capacity_before_tokens: int
    capacity_after_tokens: int
    deficit_tokens: int
    covers_deficit: bool
    added_latency_s: float
    reason: str
    pressure: tuple[ReplicaPressure, ...]

    @property
    def capacity_gain_tokens(self) -> int:
        return self.capacity_after_tokens - self.capacity_before_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "groupId": self.group_id,
            "model": self.model,
            "members": list(self.members),
            "stages": [s.to_dict() for s in self.stages],
            "capacityBeforeTokens": self.capacity_before_tokens,
            "capacityAfterTokens": self.capacity_after_tokens,
            "capacityGainTokens": self.capacity_gain_tokens,
            "deficitTokens": self.deficit_tokens,
            "coversDeficit": self.covers_deficit,
            "addedLatencySeconds": self.added_latency_s,
            "reason": self.reason,
            "pressure": [p.to_dict() for p in self.pressure],
        }


@dataclass(slots=True, frozen=True)
class ActiveGroup:
    """A group as the operator's topology has it now (the input of restore planning)."""

    group_id: str
    model: str
    stages: tuple[StagePlan, ...]
    phase: GroupPhase = GroupPhase.COOPERATIVE

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(s.replica for s in self.stages)

    @classmethod
    def from_plan(cls, plan: GroupPlan, phase: GroupPhase = GroupPhase.COOPERATIVE) -> ActiveGroup:
        return cls(plan.group_id, plan.model, plan.stages, phase)


@dataclass(slots=True, frozen=True)
class RestorePlan:
    """A restore: the group's members reload their dropped layers and serve alone again.

    split_back_demand[i] is members[i]'s demand once alone; low_since is when the group last became low.
    """

    group_id: str
    model: str
    members: tuple[str, ...]
    stages: tuple[StagePlan, ...]
    split_back_demand: tuple[float, ...]
    low_since: float
    reason: str
    pressure: tuple[ReplicaPressure, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "groupId": self.group_id,
            "model": self.model,
            "members": list(self.members),
            "stages": [s.to_dict() for s in self.stages],
            "splitBackDemand": [round(d, 4) for d in self.split_back_demand],
            "lowSince": self.low_since,
            "reason": self.reason,
            "pressure": [p.to_dict() for p in self.pressure],
        }
