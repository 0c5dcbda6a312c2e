"""The discrete-event loop: arrivals routed by the gateway's ranking, instances and groups stepping, and for
kunserve the operator's control loop calling the real planner (kunserve.operator.planner.plan_drops /
plan_restores, looked up at call time so a test can spy on them) every plan interval.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench.sim.hardware import Deployment
from bench.sim.instance import Instance
from bench.sim.migrate import Migrator
from bench.sim.state import Policy, SimError, SimRequest
from bench.sim.traces import TraceRequest
from kunserve.gateway.replicas import Health
from kunserve.gateway.router import ReplicaView, rank
from kunserve.operator import planner
from kunserve.operator.plan_types import ActiveGroup, GroupPhase, GroupPlan, PoolSpec

if TYPE_CHECKING:  # importing coop at run time pulls torch (the agent's group module): only when groups form
    from bench.sim.coop import CoopGroup, CoopSettings


def _default_pool() -> PoolSpec:
    return PoolSpec(drop_demand=0.9, restore_demand=0.5, restore_window_s=10.0, max_group_size=4)


@dataclass(slots=True)
class SimConfig:
    deployment: Deployment
    policy: Policy = Policy.VLLM
    instances: int = 8
    pool: PoolSpec = field(default_factory=_default_pool)
    plan_interval_s: float = 0.5  # the control loop's round (the operator's plan interval)
    pressure_interval_s: float = 0.25  # pressure samples for the router (agents' WatchPressure interval)
    one_reconfig_at_a_time: bool = False  # the operator's executor rule; False: every disjoint plan of a round
    coop: Any = None  # CoopSettings; None: the defaults
    cpu_cores: float | None = None  # instances share this many cores (local CPU mode); None: one device each
    threads_per_instance: float = 1.0
    drain_limit_s: float = 1800.0  # give up this long after the last arrival (stuck requests are reported)


@dataclass(slots=True)
class SimResult:
    policy: Policy
    deployment: str
    instances: int
    requests: list[SimRequest]
    reconfigs: list[dict[str, Any]]
    timeline: list[tuple[float, int, int, float, int]]  # t, waiting, running, mean demand, groups
    counters: dict[str, float]
    wall_s: float
    end_s: float

    @property
    def unfinished(self) -> int:
        return sum(1 for r in self.requests if r.finish is None)


class Simulator:
    def __init__(self, requests: Iterable[TraceRequest], config: SimConfig) -> None:
        self.config = config
        dep = self.dep = config.deployment
        if config.instances < 1:
            raise SimError("need at least one instance")
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._ids = itertools.count()
        self.instances = [Instance(i, dep, config.policy, self) for i in range(config.instances)]
        self.by_name = {i.name: i for i in self.instances}
        cap = min(dep.max_model_len, (self.instances[0].solo_blocks - 1) * dep.cost_model.block_size)
        self.reqs: list[SimRequest] = []
        for n, r in enumerate(sorted(requests, key=lambda r: r.arrival_s)):
            prompt = min(r.prompt_tokens, cap - 1)
            self.reqs.append(SimRequest(f"r{n}", r.arrival_s, prompt, max(1, min(r.output_tokens, cap - prompt))))
        self.requests = {r.rid: r for r in self.reqs}
        self.done = 0
        self.groups: dict[str, CoopGroup] = {}
        self.pending_drops: dict[str, GroupPlan] = {}
        self.low_since: dict[str, float] = {}
        self.reconfigs: list[dict[str, Any]] = []
        self.timeline: list[tuple[float, int, int, float, int]] = []
        self.samples = [(0, i.solo_blocks, 0) for i in self.instances]
        self.sent = [0] * len(self.instances)
        self.sent_blocks = [0] * len(self.instances)
        self.migrator = Migrator(self, self.instances) if config.policy is Policy.LLUMNIX else None
        self.coop: CoopSettings | None = None
        if config.policy is Policy.KUNSERVE:
            from bench.sim.coop import CoopSettings  # torch is imported only when groups can form

            self.coop = config.coop if config.coop is not None else CoopSettings()
        self._ticks = 0
        self._plan_every = max(1, round(config.plan_interval_s / config.pressure_interval_s))
        self.kv_bytes_exchanged = 0

    # ---- the Context the units use -------------------------------------------------------------------------
    def push(self, at: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._heap, (at, next(self._ids), fn, args))

    def token(self, req: SimRequest, now: float) -> bool:
        if req.first_token is None:
            req.first_token = now
        req.last_token = now
        assert req.seq is not None
        return req.seq.num_output_tokens >= req.output

    def finished(self, req: SimRequest, now: float) -> None:
        req.finish = now
        req.finished_count += 1
        req.seq = None
        self.instances[req.home].routed -= 1
        self.done += 1

    def cpu_factor(self, units: int = 1) -> float:
        if self.config.cpu_cores is None:
            return 1.0
        busy = sum(1 for i in self.instances if i.solo and i.inflight is not None)
        busy += sum(len(g.members) for g in self.groups.values() if g.inflight is not None)
        return max(1.0, (busy + units) * self.config.threads_per_instance / self.config.cpu_cores)

    # ---- the loop ------------------------------------------------------------------------------------------
    def run(self) -> SimResult:
        wall = time.perf_counter()
        for req in self.reqs:
            self.push(req.arrival, self._arrive, req)
        self.push(0.0, self._tick)
        last = self.reqs[-1].arrival if self.reqs else 0.0
        self.run_until(last + self.config.drain_limit_s, stop_when_done=True)
        counters: dict[str, float] = {
            "preemptions": sum(r.preemptions for r in self.reqs), "swaps": sum(r.swaps for r in self.reqs),
            "migrations": sum(r.migrations for r in self.reqs),
            "swap_bytes": sum(i.swap_bytes for i in self.instances),
            "migration_bytes": self.migrator.bytes if self.migrator else 0,
            "kv_bytes_exchanged": self.kv_bytes_exchanged + sum(g.kv_bytes_exchanged for g in self.groups.values()),
            "drops": sum(1 for e in self.reconfigs if e["action"] == "Drop"),
            "restores": sum(1 for e in self.reconfigs if e["action"] == "Restore"),
        }
        return SimResult(self.config.policy, self.dep.name, len(self.instances), self.reqs, self.reconfigs,
                         self.timeline, counters, time.perf_counter() - wall, self.now)

    def run_until(self, t: float, stop_when_done: bool = False) -> None:
        """Process the events due at or before t (in time order, ties in the order they were pushed)."""
        while self._heap and self._heap[0][0] <= t and not (stop_when_done and self.done >= len(self.reqs)):
            at, _, fn, args = heapq.heappop(self._heap)
            self.now = at
            fn(*args)

    def _arrive(self, req: SimRequest) -> None:
        views = []
        for inst in self.instances:
            needed, total, waiting = self.samples[inst.index]
            i = inst.index
            demand = (needed + self.sent_blocks[i]) / total if total else 0.0
            views.append(ReplicaView(inst.name, Health.UP, demand, waiting + self.sent[i], inst.routed))
        inst = self.by_name[rank(views, max_queue=1 << 62)[0].id]
        i = inst.index
        inst.routed += 1
        self.sent[i] += 1
        self.sent_blocks[i] += inst.bm.blocks_for(req.prompt + 1)
        req.home = i
        inst.add(req)
        self._kick(inst)

    def _kick(self, inst: Instance) -> None:
        if inst.group is not None:
            inst.group.poke(self.now)
        else:
            inst.kick(self.now)

    def _tick(self) -> None:
        now = self.now
        self._ticks += 1
        pressures = [inst.pressure() for inst in self.instances]
        self.samples = [(p.blocks_needed, p.blocks_total, p.num_waiting) for p in pressures]
        self.sent = [0] * len(self.instances)
        self.sent_blocks = [0] * len(self.instances)
        demand = sum(min(p.demand, 10.0) for p in pressures) / len(pressures)
        waiting = sum(len(i.sched.waiting) for i in self.instances if i.solo)
        waiting += sum(len(g.sched.waiting) for g in self.groups.values())
        running = sum(p.num_running for p in pressures if p.group is None)
        running += sum(len(g.sched.running) for g in self.groups.values())
        self.timeline.append((now, waiting, running, demand, len(self.groups)))
        if self.migrator is not None:
            self.migrator.tick(now)
        if self.coop is not None and self._ticks % self._plan_every == 0:
            self._control(now)
        for inst in self.instances:
            self._kick(inst)
        if self.done < len(self.reqs):
            self.push(now + self.config.pressure_interval_s, self._tick)

    # ---- kunserve: the operator's decisions ----------------------------------------------------------------
    def _control(self, now: float) -> None:
        cfg, cost = self.config, self.dep.cost_model
        pressures = [inst.pressure() for inst in self.instances]
        drops = planner.plan_drops(pressures, cfg.pool, cost)
        active = [ActiveGroup.from_plan(g.plan, GroupPhase.RESTORING if g.restoring else GroupPhase.COOPERATIVE)
                  for g in self.groups.values()]
        restores, self.low_since = planner.plan_restores(active, pressures, cfg.pool, cost, now=now,
                                                         low_since=self.low_since)
        busy = bool(self.pending_drops) or any(g.paused or g.restoring for g in self.groups.values())
        if cfg.one_reconfig_at_a_time and busy:
            return
        limit = 1 if cfg.one_reconfig_at_a_time else None
        if drops:
            for plan in drops[:limit]:
                self._begin_drop(plan, now)
        elif restores:
            for r in restores[:limit]:
                group = self.groups[r.group_id]
                group.begin_restore(now)
                self._record(now, "Restore", r.group_id, r.members, group.plan, r.reason)

    def _record(self, now: float, action: str, gid: str, members: Iterable[str], plan: GroupPlan, reason: str) -> None:
        self.reconfigs.append({"t": round(now, 6), "action": action, "group": gid, "members": list(members),
                               "stages": [s.to_dict() for s in plan.stages], "reason": reason,
                               "capacityGainTokens": plan.capacity_gain_tokens})

    def _begin_drop(self, plan: GroupPlan, now: float) -> None:
        members = [self.by_name[n] for n in plan.members]
        for m in members:
            m.pending_group = plan.group_id
        self.pending_drops[plan.group_id] = plan
        self._record(now, "Drop", plan.group_id, plan.members, plan, plan.reason)
        busy = [m for m in members if not m.idle]
        if not busy:
            self._commit_drop(plan.group_id, now)
        for m in busy:
            m.on_idle.append(functools.partial(self._commit_drop, plan.group_id))

    def _commit_drop(self, gid: str, now: float) -> None:
        plan = self.pending_drops.get(gid)
        if plan is None:
            return
        members = [self.by_name[n] for n in plan.members]
        if any(not m.idle for m in members):
            return
        del self.pending_drops[gid]
        from bench.sim.coop import CoopGroup

        assert self.coop is not None
        self.groups[gid] = CoopGroup(self, plan, members, self.coop, now, self._split_done)

    def _split_done(self, group: CoopGroup, now: float) -> None:
        self.kv_bytes_exchanged += group.kv_bytes_exchanged
        del self.groups[group.group_id]
        self.low_since.pop(group.group_id, None)
        for m in group.members:
            m.kick(now)

    def check_invariants(self) -> None:
        """Every block accounted (free + used = total) in every pool; a finished request holds none."""
        for inst in self.instances:
            inst.bm.check_invariant()
            if self.done == len(self.reqs) and inst.bm.num_used_blocks:
                raise SimError(f"{inst.name}: {inst.bm.num_used_blocks} blocks still used after the last request")


def simulate(requests: Iterable[TraceRequest], config: SimConfig) -> SimResult:
    """Run one policy over one trace on a pool of identical instances."""
    sim = Simulator(requests, config)
    result = sim.run()
    sim.check_invariants()
    return result
