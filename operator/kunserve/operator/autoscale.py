"""The coordinated autoscaling policy: drop now, scale out at once, restore when the new replicas are Ready.

A new replica needs minutes (image pull, weight load, warm-up) before it serves; a drop frees KV memory in
milliseconds. So under a burst the pool does both, and the drop bridges the cold start (pure: no I/O, no
clock; the same code runs in the operator and in local mode):

1. Recommendation: the replicas that carry the pool's KV need at `target_demand` of their *full* (no-drop)
   capacity: ceil(blocks_needed / (target_demand x full blocks per ready replica)), clamped to
   [min_replicas, max_replicas] (External driver: the count an HPA / KEDA wrote into spec.replicas, clamped).
   Stabilisation as an HPA does it: scale up to the *lowest* recommendation of the last scale_up_window_s,
   down to the *highest* of the last scale_down_window_s.
2. Scale-up: the workload grows at once to the stabilised recommendation. It is a *bridge* when a group is
   formed or a drop is planned in the same round: the drop covers the burst until the new replicas are Ready.
3. Ready: every new replica reports fresh pressure (the agent answers Status and streams pressure: weights
   loaded, warmed). Then the groups the bridge covered restore, in order of the pressure they would be left
   with (the largest split-back demand of their members, lowest first), one per round, each only once that
   demand is below drop_demand and every member is fresh (restoring into a new drop would oscillate).
4. Cancel: demand falls before the new replicas are Ready (the recommendation is no more than the replicas
   that were there): the scale-up is cancelled at once (the new replicas never served: no window, no drain)
   and the covered groups restore as in 3.
5. Scale-down (stabilised recommendation below the workload): the highest ordinals go (a StatefulSet removes
   those), never one in a group: such a replica holds the count until its group has restored. Each is first
   *drained*: the topology stops routing new requests to it; from the next round on it is removed once it
   runs and queues nothing (its streams finished), once it reports nothing fresh, or after drain_timeout_s
   (the gateway replays what it still streams on another replica). A recommendation that rises again ends the drain.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from kunserve.operator.cost_model import CostModel
from kunserve.operator.naming import agent_pod_name
from kunserve.operator.plan_types import ActiveGroup, GroupPhase, PoolSpec, ReplicaPressure
from kunserve.operator.planner import split_back_demands
from kunserve.operator.pool_signals import PoolSignals, measure


class Driver(StrEnum):
    OPERATOR = "Operator"  # the operator's own recommendation drives the replica count
    EXTERNAL = "External"  # an HPA / KEDA drives spec.replicas through the ServingPool's scale subresource


class ScaleEvent(StrEnum):
    SCALE_UP = "ScaleUp"
    READY = "ScaleUpReady"
    CANCEL = "ScaleUpCancelled"
    DRAIN = "Drain"
    SCALE_DOWN = "ScaleDown"


@dataclass(slots=True, frozen=True)
class AutoscalePolicy:
    min_replicas: int = 1
    max_replicas: int = 1
    target_demand: float = 0.7
    scale_up_window_s: float = 0.0
    scale_down_window_s: float = 300.0
    drain_timeout_s: float = 300.0
    driver: Driver = Driver.OPERATOR

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if not 0 < self.target_demand <= 4:
            raise ValueError(f"target_demand must be in (0, 4], got {self.target_demand}")
        if min(self.scale_up_window_s, self.scale_down_window_s, self.drain_timeout_s) < 0:
            raise ValueError("windows and drain timeout must be >= 0")

    def clamp(self, replicas: int) -> int:
        return min(max(replicas, self.min_replicas), self.max_replicas)


@dataclass(slots=True, frozen=True)
class ScaleUp:
    """A scale-out not Ready yet: replicas [start, target) were asked for at `since`."""

    start: int
    target: int
    since: float
    bridge: bool  # a drop covers it


@dataclass(slots=True, frozen=True)
class ScaleState:
    replicas: int  # the workload's replica count
    scale_up: ScaleUp | None = None
    draining: tuple[tuple[str, float], ...] = ()  # (replica, since), lowest ordinal first
    release: tuple[str, ...] = ()  # groups a finished (or cancelled) bridge lets restore
    history: tuple[tuple[float, int], ...] = ()  # (time, recommendation) within the longest window

    @property
    def draining_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.draining)


@dataclass(slots=True, frozen=True)
class ScaleDecision:
    state: ScaleState
    signals: PoolSignals
    recommendation: int  # this round's, before stabilisation
    restores: tuple[str, ...]  # group ids that may restore now, in order
    event: ScaleEvent | None = None
    reason: str = ""

    @property
    def replicas(self) -> int:
        return self.state.replicas


def recommend(signals: PoolSignals, policy: AutoscalePolicy, current: int) -> int:
    """Replicas that carry blocks_needed at target_demand of full capacity (current when nothing is ready)."""
    if signals.ready_replicas == 0 or signals.blocks_full == 0:
        return policy.clamp(current)
    per_replica = signals.blocks_full / signals.ready_replicas
    return policy.clamp(math.ceil(signals.blocks_needed / (policy.target_demand * per_replica) - 1e-9))


def restore_order(groups: Sequence[ActiveGroup], pressures: Iterable[ReplicaPressure], spec: PoolSpec,
                  cost: CostModel, allowed: Iterable[str] | None = None) -> tuple[str, ...]:
    """Cooperative groups (of `allowed`, default all) whose members are all fresh and would be left with a
    demand below drop_demand, by that demand (lowest first), then id."""
    fresh = {p.name: p for p in pressures if not p.stale}
    keep = None if allowed is None else set(allowed)
    ranked = []
    for g in groups:
        if g.phase is not GroupPhase.COOPERATIVE or (keep is not None and g.group_id not in keep):
            continue
        if not all(m in fresh for m in g.members):
            continue
        worst = max(split_back_demands(g, [fresh[m] for m in g.members], cost))
        if worst < spec.drop_demand:
            ranked.append((worst, g.group_id))
    return tuple(gid for _, gid in sorted(ranked))


def _window(history: Sequence[tuple[float, int]], now: float, window_s: float) -> list[int]:
    return [r for t, r in history if now - t <= window_s + 1e-9]


def step(pressures: Sequence[ReplicaPressure], groups: Sequence[ActiveGroup], state: ScaleState, *, pool: str,
         spec: PoolSpec, cost: CostModel, policy: AutoscalePolicy, now: float, dropping: bool = False,
         external: int | None = None) -> ScaleDecision:
    """One round: the new state, the signals to export and the groups that may restore now.

    pressures: as the collector has them (with the pool's groups); dropping: a drop is planned this round;
    external: spec.replicas under the External driver (ignored otherwise)."""
    fresh = {p.name: p for p in pressures if not p.stale}
    grouped = {m for g in groups for m in g.members}
    workload = {agent_pod_name(pool, i) for i in range(state.replicas)}
    base = measure([p for p in fresh.values() if p.name in workload or p.name in grouped], groups, cost,
                   replicas=state.replicas, desired=state.replicas)
    if policy.driver is Driver.EXTERNAL and external is not None:
        rec = policy.clamp(external)
    else:
        rec = recommend(base, policy, state.replicas)
    longest = max(policy.scale_up_window_s, policy.scale_down_window_s)
    history = tuple((t, r) for t, r in (*state.history, (now, rec)) if now - t <= longest + 1e-9)
    up_to = min(_window(history, now, policy.scale_up_window_s))
    down_to = max(_window(history, now, policy.scale_down_window_s))
    live = {g.group_id for g in groups}
    release = tuple(g for g in state.release if g in live)
    st = replace(state, history=history, release=release)
    event: ScaleEvent | None = None
    reason = ""

    su = st.scale_up
    if su is not None:
        new = [agent_pod_name(pool, i) for i in range(su.start, su.target)]
        if all(n in fresh for n in new):
            event, reason = ScaleEvent.READY, f"{len(new)} new replica(s) ready after {now - su.since:.1f} s"
            st = replace(st, scale_up=None, release=_merge(release, live) if su.bridge or live else release)
        elif rec <= su.start and not dropping:
            target = max(su.start, policy.min_replicas)
            event = ScaleEvent.CANCEL
            reason = f"demand fell to {base.demand:.2f} of full capacity before the new replicas were ready"
            st = replace(st, replicas=target, scale_up=None, release=_merge(release, live))
        elif up_to > su.target:
            st = replace(st, replicas=up_to, scale_up=replace(su, target=up_to, bridge=su.bridge or dropping
                                                             or bool(live)))
            event, reason = ScaleEvent.SCALE_UP, f"scale-up extended to {up_to}"
    elif up_to > st.replicas:
        bridge = dropping or bool(live)
        event = ScaleEvent.SCALE_UP
        reason = (f"KV need {base.blocks_needed} blocks is {base.demand:.2f} of full capacity: {st.replicas} -> "
                  f"{up_to} replicas" + (" (a drop bridges the start-up)" if bridge else ""))
        st = replace(st, replicas=up_to, draining=(),
                     scale_up=ScaleUp(start=st.replicas, target=up_to, since=now, bridge=bridge))
    else:
        st, event, reason = _scale_down(st, fresh, grouped, pool, policy, now, down_to)

    restores = restore_order(groups, pressures, spec, cost, st.release) if st.release else ()
    desired = up_to if up_to > st.replicas else max(down_to, policy.min_replicas) if down_to < st.replicas \
        else st.replicas
    signals = replace(base, replicas=st.replicas, desired_replicas=desired)
    return ScaleDecision(state=st, signals=signals, recommendation=rec, restores=restores, event=event,
                         reason=reason)


def _merge(a: Iterable[str], b: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({*a, *b}))


def _scale_down(st: ScaleState, fresh: Mapping[str, ReplicaPressure], grouped: set[str], pool: str,
                policy: AutoscalePolicy, now: float, down_to: int) -> tuple[ScaleState, ScaleEvent | None, str]:
    """Drain the replicas above down_to (top ordinals first, none in a group); remove the drained ones."""
    target = max(down_to, policy.min_replicas)
    since = dict(st.draining)
    wanted: list[str] = []
    for i in range(st.replicas - 1, target - 1, -1):
        name = agent_pod_name(pool, i)
        if name in grouped:
            break  # a group member holds the count (and every ordinal below it)
        wanted.append(name)
    if not wanted:
        return replace(st, draining=()), None, ""
    draining = tuple((n, since.get(n, now)) for n in reversed(wanted))
    fresh_drain = [n for n in wanted if n not in since]
    removable = 0
    for name in wanted:  # from the top: a replica goes once everything above it went
        p, started = fresh.get(name), since.get(name, now)
        idle = p is not None and p.num_running == 0 and p.num_waiting == 0 and name in since
        if idle or (name in since and (p is None or now - started >= policy.drain_timeout_s)):
            removable += 1
        else:
            break
    if removable:
        gone = wanted[:removable]
        replicas = st.replicas - removable
        return (replace(st, replicas=replicas, draining=tuple(d for d in draining if d[0] not in gone)),
                ScaleEvent.SCALE_DOWN, f"removed drained {', '.join(gone)}: {replicas} replicas")
    if fresh_drain:
        return (replace(st, draining=draining), ScaleEvent.DRAIN,
                f"draining {', '.join(reversed(fresh_drain))} (recommended {down_to})")
    return replace(st, draining=draining), None, ""
