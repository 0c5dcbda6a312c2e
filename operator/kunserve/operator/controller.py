"""The control loop's decisions, shared by the Kubernetes operator and local mode (pure: no I/O, no clock).

Each round: the collector's pressures + the pool's groups + the pool's elasticity + a cost model → at most one
reconfiguration (`decide`). Drops come first (a queue is hurting time to first token now); otherwise the
groups due for a restore. One reconfiguration at a time per pool: the next round plans again from the
pressures and groups the last one left, so plans never race each other's epochs.

The cost model comes from the model's config.json where the controller can read it (local mode), or from an
agent's Status (Kubernetes: the checkpoint lives in the agents' volume): `cost_from_statuses` takes a full
replica's weight bytes evenly per layer (embedding and head spread over the layers) and the KV bytes per token
per layer from its block size. The planner only ranks candidate groups with it; the agents check the real
memory in Prepare.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kunserve.operator.agent_client import AgentStatus
from kunserve.operator.autoscale import AutoscalePolicy, ScaleDecision, ScaleState, step
from kunserve.operator.cost_model import CostModel
from kunserve.operator.naming import agent_pod_name
from kunserve.operator.plan_types import PoolSpec, ReplicaPressure
from kunserve.operator.planner import plan_drops, plan_restores, split_back_demands
from kunserve.operator.reconfig import Action, FormedGroup, GroupChange, ReconfigSpec, pressure_snapshot


@dataclass(slots=True, frozen=True)
class Decision:
    action: Action
    group: GroupChange
    reason: str
    pressure: tuple[ReplicaPressure, ...]

    def spec(self, pool: str, epoch: int) -> ReconfigSpec:
        return ReconfigSpec(pool=pool, epoch=epoch, action=self.action, groups=(self.group,), reason=self.reason,
                            manual=False, pressure=pressure_snapshot(self.pressure))


def dissolved_groups(groups: Sequence[FormedGroup], serving_alone: Mapping[str, int]) -> list[FormedGroup]:
    """Groups a member has left on its own: it reports serving alone at the group's epoch or later (a member
    lost in the cooperative phase makes the survivors restore themselves). An agent still at an older epoch
    has not seen the group's commit yet and says nothing about it."""
    return [g for g in groups if any(serving_alone.get(m, -1) >= g.epoch for m in g.members)]


def replica_names(pool: str, replicas: int) -> list[str]:
    """The agents of a pool: pod names in Kubernetes, the same ids in local mode."""
    return [agent_pod_name(pool, i) for i in range(replicas)]


def next_epoch(pool_epoch: int, other_epochs: Iterable[int] = ()) -> int:
    """One above the pool's epoch and every reconfiguration already created for it."""
    return 1 + max([pool_epoch, *other_epochs])


def with_groups(pressures: Iterable[ReplicaPressure], groups: Sequence[FormedGroup]) -> list[ReplicaPressure]:
    """The pressures with each replica's group as the pool records it. A replica the pool has in no group but
    that reports one (a reconfiguration the pool has not recorded yet) keeps it, so no new group takes it."""
    member_of = {m: g.id for g in groups for m in g.members}
    out = []
    for p in pressures:
        group = member_of.get(p.name, p.group)
        out.append(p if group == p.group else dataclasses.replace(p, group=group))
    return out


def decide(pressures: Iterable[ReplicaPressure], groups: Sequence[FormedGroup], *, model: str, spec: PoolSpec,
           cost: CostModel, now: float, low_since: Mapping[str, float]) -> tuple[Decision | None, dict[str, float]]:
    """At most one reconfiguration to start now, and the restore windows to carry to the next round."""
    current = with_groups(pressures, groups)
    restores, carried = plan_restores([g.to_active(model) for g in groups], current, spec, cost, now=now,
                                      low_since=low_since)
    drops = plan_drops(current, spec, cost)
    if drops:
        plan = drops[0]
        return Decision(Action.DROP, GroupChange(plan.group_id, plan.members, plan.stages), plan.reason,
                        plan.pressure), carried
    if restores:
        r = restores[0]
        return Decision(Action.RESTORE, GroupChange(r.group_id, r.members, r.stages), r.reason, r.pressure), carried
    return None, carried


@dataclass(slots=True, frozen=True)
class Round:
    """One control round: at most one reconfiguration, the autoscaler's decision (None without autoscaling) and
    the restore windows to carry."""

    decision: Decision | None
    scale: ScaleDecision | None
    low_since: dict[str, float]


def decide_round(pressures: Iterable[ReplicaPressure], groups: Sequence[FormedGroup], *, pool: str, model: str,
                 spec: PoolSpec, cost: CostModel, now: float, low_since: Mapping[str, float], elasticity: bool = True,
                 policy: AutoscalePolicy | None = None, scale: ScaleState | None = None,
                 external: int | None = None) -> Round:
    """decide() with the coordinated autoscaler (autoscale.py): a drop first (and, in the same round, the
    scale-out it bridges); else a group the finished or cancelled scale-out releases, least pressure left first;
    else a restore by the planner's window."""
    current = with_groups(pressures, groups)
    active = [g.to_active(model) for g in groups]
    restores, carried = plan_restores(active, current, spec, cost, now=now, low_since=low_since) if elasticity \
        else ([], {})
    drops = plan_drops(current, spec, cost) if elasticity else []
    scaled = None
    if policy is not None and scale is not None:
        scaled = step(current, active, scale, pool=pool, spec=spec, cost=cost, policy=policy, now=now,
                      dropping=bool(drops), external=external)
    decision: Decision | None = None
    if drops:
        plan = drops[0]
        decision = Decision(Action.DROP, GroupChange(plan.group_id, plan.members, plan.stages), plan.reason,
                            plan.pressure)
    elif elasticity and scaled is not None and scaled.restores:
        group = next(g for g in active if g.group_id == scaled.restores[0])
        by_name = {p.name: p for p in current}
        members = tuple(by_name[m] for m in group.members)
        left = max(split_back_demands(group, members, cost))
        decision = Decision(Action.RESTORE, GroupChange(group.group_id, group.members, group.stages),
                            f"scale-out bridged: the new replicas serve, the group is left with demand {left:.2f} "
                            f"(< drop {spec.drop_demand})", members)
    elif restores:
        r = restores[0]
        decision = Decision(Action.RESTORE, GroupChange(r.group_id, r.members, r.stages), r.reason, r.pressure)
    return Round(decision, scaled, carried)


def cost_from_statuses(statuses: Iterable[AgentStatus], stage_latency_s: float | None = None) -> CostModel | None:
    """A cost model from an agent's Status, preferring one that holds every layer; None when none can tell."""
    candidates = sorted((s for s in statuses if s.num_layers > 0 and s.layer_end > s.layer_start and s.block_size > 0
                         and s.kv_block_bytes > 0),
                        key=lambda s: (s.layer_end - s.layer_start != s.num_layers, s.agent_id))
    if not candidates:
        return None
    s = candidates[0]
    held = s.layer_end - s.layer_start
    per_token_layer = max(s.kv_block_bytes // (s.block_size * held), 1)
    cost = CostModel(num_layers=s.num_layers, layer_bytes=max(s.weight_bytes // held, 0), embed_bytes=0,
                     head_bytes=0, kv_bytes_per_token_layer=per_token_layer, block_size=s.block_size)
    return cost if stage_latency_s is None else dataclasses.replace(cost, stage_latency_s=stage_latency_s)
