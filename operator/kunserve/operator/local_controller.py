"""Local mode's control loop: the operator's collector → planner (+ autoscaler) → executor without Kubernetes.

`LocalController` runs one round at a time (`step`): a manual request from `kunserve reconfigure --redis` if one
waits, else the planner's drop or restore and the autoscaler's decision (spec.autoscaling): the same
`controller.decide_round` the operator's pressure daemon runs. Every reconfiguration is stored in Redis (hash
`kunserve:reconfigurations:{pool}`), the topology is published under a new epoch for every change (a group, a
replica joining or leaving, a drain), and every decision is kept, timed, in `events`. One lock serialises the
topology changes: a replica that starts serving waits for a reconfiguration in flight, so epochs never race.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from kunserve.operator.autoscale import ScaleDecision, ScaleState
from kunserve.operator.autoscale_status import PoolMetrics
from kunserve.operator.controller import decide_round, dissolved_groups, next_epoch, replica_names
from kunserve.operator.cost_model import CostModel, even_split
from kunserve.operator.executor import Executor, OutcomeUnknownError
from kunserve.operator.plan_types import StagePlan
from kunserve.operator.planner import group_id_for
from kunserve.operator.pool_signals import PoolSignals
from kunserve.operator.pool_spec import ServingPool
from kunserve.operator.pressure import PressureCollector
from kunserve.operator.reconfig import (
    Action,
    FormedGroup,
    GroupChange,
    InvalidReconfiguration,
    ReconfigRecord,
    ReconfigSpec,
    ReconfigurationLog,
    apply_committed,
    check_drop,
    reconfiguration_name,
    resolve_restore,
)
from kunserve.operator.topology_writer import ReplicaEndpoint, build_topology, write_topology

REPLY_TTL_S = 300


def records_key(pool: str) -> str:
    return f"kunserve:reconfigurations:{pool}"


def requests_key(pool: str) -> str:
    return f"kunserve:reconfigure:{pool}:requests"


def reply_key(pool: str, request_id: str) -> str:
    return f"kunserve:reconfigure:{pool}:reply:{request_id}"


def state_key(pool: str) -> str:
    return f"kunserve:local:{pool}"


@dataclass(slots=True)
class RedisRecordStore:
    """Saves a reconfiguration's record (with its spec) in the pool's hash of reconfigurations."""

    redis: Redis
    pool: str
    name: str
    spec: ReconfigSpec
    last: ReconfigRecord = field(default_factory=ReconfigRecord)

    async def save(self, record: ReconfigRecord) -> None:
        self.last = record.copy()
        await self.redis.hset(records_key(self.pool), self.name,
                              ReconfigurationLog(self.name, self.spec, record).to_json())


@dataclass(slots=True, frozen=True)
class ControlEvent:
    at: float  # the controller's clock
    kind: str  # Drop, Restore, ScaleUp, ScaleUpReady, ScaleUpCancelled, Drain, ScaleDown, AgentServing, GroupLost
    detail: str


class Scaler(Protocol):
    async def scale_to(self, replicas: int) -> None: ...


@dataclass(slots=True)
class LocalController:
    """collector → planner → executor, one reconfiguration at a time, plus manual requests from Redis."""

    pool: ServingPool
    redis: Redis
    endpoints: dict[str, str]  # agent id -> host:port
    cost: CostModel
    collector: PressureCollector
    executor: Executor
    out: Callable[[str], None] = print
    clock: Callable[[], float] = time.time
    epoch: int = 0
    allocated: int = 0  # the highest epoch handed out (a failed reconfiguration's epoch is not reused)
    groups: tuple[FormedGroup, ...] = ()
    low_since: dict[str, float] = field(default_factory=dict)
    history: list[ReconfigurationLog] = field(default_factory=list)
    gateway_url: str = ""
    scaler: Scaler | None = None  # starts and stops agent processes (autoscaling)
    scale: ScaleState | None = None
    signals: PoolSignals | None = None
    metrics: PoolMetrics | None = None
    events: list[ControlEvent] = field(default_factory=list)  # drops, restores and scaling decisions, timed
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one topology change at a time

    @property
    def name(self) -> str:
        return self.pool.ref.name

    @property
    def draining(self) -> tuple[str, ...]:
        return self.scale.draining_names if self.scale is not None else ()

    def topology(self) -> dict[str, Any]:
        replicas = [ReplicaEndpoint(a, e) for a, e in self.endpoints.items()]
        return build_topology(epoch=self.epoch, model=self.pool.spec.model.name, replicas=replicas,
                              groups=self.groups, num_layers=self.cost.num_layers, updated_at=self.clock(),
                              draining=self.draining)

    async def publish(self) -> None:
        """The topology, then the description of the running pool."""
        await write_topology(self.redis, self.name, self.topology())
        state = {"pool": self.name, "model": self.pool.spec.model.name, "gateway": self.gateway_url,
                 "agents": self.endpoints, "epoch": self.epoch, "groups": [g.to_status() for g in self.groups],
                 "pid": os.getpid()}
        if self.scale is not None and self.signals is not None:
            state["autoscaling"] = {"replicas": self.scale.replicas, "draining": list(self.draining),
                                    "desiredReplicas": self.signals.desired_replicas, **self.signals.to_status()}
        await self.redis.set(state_key(self.name), json.dumps(state, separators=(",", ":")))

    async def step(self) -> ReconfigurationLog | None:
        """One round: a manual request if one waits, else the planner's decision (if elasticity is on) and the
        autoscaler's (with spec.autoscaling)."""
        async with self.lock:
            await self.forget_dissolved()  # first: a manual restore must not name a group its members left
            raw = await self.redis.lpop(requests_key(self.name))
            if isinstance(raw, str | bytes):
                return await self.manual(raw)
            scaling = self.pool.spec.autoscaling
            if not self.pool.spec.elasticity.enabled and scaling is None:
                return None
            pressures = self.collector.snapshot()
            if not pressures:
                return None
            if scaling is not None and self.scale is None:
                self.scale = ScaleState(replicas=len(self.endpoints))
            rnd = decide_round(pressures, self.groups, pool=self.name, model=self.pool.spec.model.name,
                               spec=self.pool.spec.elasticity.to_planner(), cost=self.cost, now=self.clock(),
                               low_since=self.low_since, elasticity=self.pool.spec.elasticity.enabled,
                               policy=scaling.to_policy() if scaling is not None else None, scale=self.scale,
                               external=self.pool.spec.replicas)
            self.low_since = rnd.low_since
            if rnd.scale is not None:
                await self.apply_scale(rnd.scale)
            decision = rnd.decision
            if decision is None:
                return None
            self.low_since.pop(decision.group.id, None)
            return await self.run(decision.spec(self.name, self.take_epoch()))

    async def forget_dissolved(self) -> None:
        """Drop the groups a member left on its own (see controller.dissolved_groups) and publish the topology
        under a new epoch, so it matches what the agents report."""
        gone = dissolved_groups(self.groups, self.collector.serving_alone())
        if not gone:
            return
        self.groups = tuple(g for g in self.groups if g not in gone)
        self.epoch = self.take_epoch()
        detail = f"groups {[g.id for g in gone]} were left by their members (a member was lost); forgotten"
        self.events.append(ControlEvent(self.clock(), "GroupLost", detail))
        self.out(detail)
        await self.publish()

    async def apply_scale(self, scale: ScaleDecision) -> None:
        """The autoscaler's decision: replicas removed from the topology before their processes stop, new ones
        started (they join the topology once they serve: add_replica), drains published."""
        before = self.scale or scale.state
        self.scale, self.signals = scale.state, scale.signals
        event = scale.event.value if scale.event is not None else None
        if self.metrics is not None:
            self.metrics.observe("local", self.name, scale.signals, event)
        if event is not None:
            self.events.append(ControlEvent(self.clock(), event, scale.reason))
            self.out(f"autoscaling {event}: {scale.reason}")
        keep = set(replica_names(self.name, scale.state.replicas))
        gone = [a for a in self.endpoints if a not in keep and a not in {m for g in self.groups for m in g.members}]
        for agent_id in gone:
            self.endpoints.pop(agent_id)
        if gone or set(before.draining_names) != set(self.draining):
            self.collector.set_targets(self.endpoints)
            self.epoch = self.take_epoch()
            await self.publish()
        if self.scaler is not None and before.replicas != scale.state.replicas:
            await self.scaler.scale_to(scale.state.replicas)

    async def add_replica(self, agent_id: str, endpoint: str) -> None:
        """A scale-out's agent serves: follow its pressure and route to it (a new topology epoch)."""
        async with self.lock:
            self.endpoints[agent_id] = endpoint
            self.collector.set_targets(self.endpoints)
            self.epoch = self.take_epoch()
            await self.publish()
            self.events.append(ControlEvent(self.clock(), "AgentServing", agent_id))

    def take_epoch(self, wanted: int | None = None) -> int:
        epoch = wanted if wanted is not None else next_epoch(self.epoch, [self.allocated])
        self.allocated = max(self.allocated, epoch)
        return epoch

    async def run(self, spec: ReconfigSpec) -> ReconfigurationLog:
        name = reconfiguration_name(self.name, spec.action, spec.epoch)
        store = RedisRecordStore(self.redis, self.name, name, spec)
        record = ReconfigRecord()
        await store.save(record)
        while True:
            try:
                record = await self.executor.execute(
                    spec, {m: self.endpoints[m] for m in spec.members if m in self.endpoints}, record=record,
                    store=store, on_committed=lambda s, r: self.committed(name, s, r), current_epoch=self.epoch,
                    num_layers=self.cost.num_layers)
                break
            except OutcomeUnknownError as exc:  # a leader does not answer: ask again later, never guess
                self.out(f"reconfiguration {name}: {exc}; retrying")
                record = store.last
                await asyncio.sleep(1.0)
        entry = ReconfigurationLog(name, spec, record)
        self.history.append(entry)
        self.events.append(ControlEvent(self.clock(), spec.action.value, f"{name}: {record.phase.value}"))
        self.out(f"reconfiguration {entry.summary()}")
        return entry

    async def committed(self, name: str, spec: ReconfigSpec, record: ReconfigRecord) -> None:
        """The executor's on_committed: the new groups, the epoch, published."""
        self.groups = apply_committed(self.groups, spec, record.committed_groups, name)
        self.epoch = max(self.epoch, spec.epoch)
        await self.publish()

    async def manual(self, raw: str | bytes) -> ReconfigurationLog | None:
        """A request from `kunserve reconfigure`: run it, answer on its reply key."""
        request_id = ""
        try:
            request = json.loads(raw)
            request_id = str(request.get("id") or "")
            spec = self.manual_spec(request)
        except (ValueError, TypeError, KeyError, InvalidReconfiguration) as exc:
            await self._reply(request_id, {"error": str(exc)})
            self.out(f"manual reconfiguration refused: {exc}")
            return None
        entry = await self.run(spec)
        await self._reply(request_id, json.loads(entry.to_json()))
        return entry

    def manual_spec(self, request: Mapping[str, Any]) -> ReconfigSpec:
        action = Action(str(request.get("action")))
        reason = str(request.get("reason") or f"manual {action.value.lower()}")
        epoch = request.get("epoch")
        if epoch is not None and (not isinstance(epoch, int) or epoch <= self.allocated):
            raise InvalidReconfiguration([f"epoch {epoch} is not newer than {self.allocated}"])
        members = tuple(str(m) for m in request.get("members") or ())
        if action is Action.DROP:
            if len(members) < 2:
                raise InvalidReconfiguration(["a drop needs at least 2 members"])
            ranges = request.get("ranges") or even_split(self.cost.num_layers, len(members))
            stages = tuple(StagePlan(m, int(a), int(b)) for m, (a, b) in zip(members, ranges, strict=True))
            group = GroupChange(str(request.get("group") or group_id_for(members)), members, stages)
        else:
            wanted = request.get("group")
            found = next((g for g in self.groups if g.id == wanted or (members and set(members) <= set(g.members))),
                         None)
            if wanted is None and not members and len(self.groups) == 1:
                found = self.groups[0]  # the only group there is
            if found is None:
                raise InvalidReconfiguration([f"no formed group matches {wanted or list(members)} "
                                              f"(formed: {[g.id for g in self.groups] or 'none'})"])
            group = GroupChange(found.id, found.members, found.stages)
        spec = ReconfigSpec(pool=self.name, epoch=0, action=action, groups=(group,), reason=reason, manual=True)
        problems = spec.problems(self.cost.num_layers)
        if problems:
            raise InvalidReconfiguration(problems)
        spec = resolve_restore(spec, self.groups)
        check_drop(spec, list(self.endpoints), self.groups)
        return ReconfigSpec(pool=spec.pool, epoch=self.take_epoch(epoch), action=action, groups=spec.groups,
                            reason=reason, manual=True)

    async def _reply(self, request_id: str, payload: Mapping[str, Any]) -> None:
        if request_id:
            key = reply_key(self.name, request_id)
            await self.redis.rpush(key, json.dumps(payload))
            await self.redis.expire(key, REPLY_TTL_S)

    async def loop(self, interval_s: float) -> None:
        """Rounds until cancelled; a failed round is reported and the loop goes on."""
        while True:
            try:
                await self.step()
            except (RedisError, OSError) as exc:
                self.out(f"controller round failed: {type(exc).__name__}: {exc}")
            await asyncio.sleep(interval_s)
