"""The pressure daemon of one ServingPool (no kopf here): collector → planner → Reconfiguration resources.

Every round (`tick`), from the pool as the API server has it now:
- follow the WatchPressure stream of every agent of the pool (and of any group member beyond spec.replicas);
- keep the serving topology in Redis in step with the pool when nothing is reconfiguring: write it when it is
  missing; when the replicas changed (scaled), publish it under a new epoch (recorded in the pool first);
- wait while any Reconfiguration of the pool is not finished (one at a time per pool; after an operator
  restart the unfinished one is resumed by its own handler, never planned again);
- otherwise plan (controller.decide) and create at most one Reconfiguration, named by pool, action and epoch
  (a second creation of the same epoch conflicts instead of repeating it); the epoch is one above the pool's
  and every Reconfiguration of the pool;
- keep the newest KEEP_RECONFIGURATIONS finished Reconfigurations of the pool (the history stays bounded).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from redis.exceptions import RedisError

from kunserve.operator.autoscale import ScaleDecision
from kunserve.operator.autoscale_status import state_from_status, status_of, without_nulls
from kunserve.operator.controller import cost_from_statuses, decide_round, next_epoch, replica_names
from kunserve.operator.cost_model import CostModel
from kunserve.operator.kube import RECONFIGURATIONS, SERVINGPOOLS, Conflict, KubeApiError
from kunserve.operator.kube_runtime import (
    Runtime,
    patch_pool_status,
    pool_epoch,
    pool_topology,
    reconfiguration_manifest,
)
from kunserve.operator.manifests import agent_statefulset
from kunserve.operator.pool_spec import InvalidServingPool, ServingPool, draining_replicas, workload_replicas
from kunserve.operator.pressure import PressureCollector
from kunserve.operator.reconcile import StatusConflictError, utc_now
from kunserve.operator.reconfig import (
    TERMINAL_PHASES,
    FormedGroup,
    ReconfigRecord,
    groups_from_status,
    reconfiguration_name,
)
from kunserve.operator.topology_writer import StaleTopologyError, read_topology, same_layout, write_topology
from kunserve.operator.validation import parse_pool

Log = logging.Logger | logging.LoggerAdapter[Any]
KEEP_RECONFIGURATIONS = 100  # finished Reconfigurations kept per pool (older ones are deleted)


class Tick(StrEnum):
    GONE = "gone"  # the pool is gone or being deleted
    INVALID = "invalid"  # its spec is invalid (reported by the ServingPool handlers)
    IN_FLIGHT = "in-flight"  # a Reconfiguration of the pool is running
    DISABLED = "disabled"  # spec.elasticity.enabled is false and there is no spec.autoscaling
    NO_DATA = "no-data"  # no agent has reported yet
    IDLE = "idle"  # nothing to do
    CREATED = "created"  # a Reconfiguration was created


@dataclass(slots=True)
class PoolDaemon:
    rt: Runtime
    namespace: str
    name: str
    collector: PressureCollector
    low_since: dict[str, float] = field(default_factory=dict)
    cost: CostModel | None = None
    last: str = ""  # the last Reconfiguration created
    history: tuple[tuple[float, int], ...] = ()  # the autoscaler's recommendations (stabilisation windows)

    async def tick(self, logger: Log) -> Tick:
        rt = self.rt
        body = await rt.api.get(SERVINGPOOLS, self.namespace, self.name)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return Tick.GONE
        try:
            pool = parse_pool(body)
        except InvalidServingPool:
            return Tick.INVALID
        status = body.get("status") or {}
        groups = groups_from_status(status.get("groups"))
        replicas = workload_replicas(pool, status)
        members = set(replica_names(self.name, replicas)) | {m for g in groups for m in g.members}
        self.collector.set_targets({m: rt.endpoint(self.namespace, self.name, m) for m in sorted(members)})
        ours = [r for r in await rt.api.list(RECONFIGURATIONS, self.namespace)
                if (r.get("spec") or {}).get("pool") == self.name]
        epochs = [e for r in ours if isinstance(e := (r.get("spec") or {}).get("epoch"), int)]
        if any(ReconfigRecord.from_status(r.get("status")).phase not in TERMINAL_PHASES for r in ours):
            return Tick.IN_FLIGHT
        await self.prune(ours)
        await self.ensure_topology(pool, status, groups, epochs, logger)
        scaling = pool.spec.autoscaling
        if not pool.spec.elasticity.enabled and scaling is None:
            return Tick.DISABLED
        self.cost = cost_from_statuses(self.collector.statuses().values()) or self.cost
        pressures = self.collector.snapshot()
        if self.cost is None or not pressures:
            return Tick.NO_DATA
        now = rt.clock()
        rnd = decide_round(pressures, groups, pool=self.name, model=pool.spec.model.name,
                           spec=pool.spec.elasticity.to_planner(), cost=self.cost, now=now, low_since=self.low_since,
                           elasticity=pool.spec.elasticity.enabled,
                           policy=scaling.to_policy() if scaling is not None else None,
                           scale=state_from_status(pool, status, self.history) if scaling is not None else None,
                           external=pool.spec.replicas)
        self.low_since = rnd.low_since
        if rnd.scale is not None:
            await self.apply_scale(pool, status, rnd.scale, logger)
        decision = rnd.decision
        if decision is None:
            return Tick.IDLE
        epoch = next_epoch(pool_epoch(status), epochs)
        spec = decision.spec(self.name, epoch)
        name = reconfiguration_name(self.name, decision.action, epoch)
        try:
            await rt.api.create(reconfiguration_manifest(spec, name, pool.ref))
        except Conflict:
            return Tick.IN_FLIGHT  # created meanwhile (another operator replica, or a restart's race)
        self.low_since.pop(decision.group.id, None)
        self.last = name
        logger.info("created Reconfiguration %s: %s %s (%s)", name, decision.action.value, decision.group.id,
                    decision.reason)
        return Tick.CREATED

    async def apply_scale(self, pool: ServingPool, status: Mapping[str, Any], scale: ScaleDecision,
                          logger: Log) -> None:
        """Record the autoscaler's state in status.autoscaling, then set the StatefulSet's replica count (the
        status first: a resync reads the count from there) and export the pool's signals."""
        rt, st = self.rt, scale.state
        self.history = st.history
        wanted = status_of(scale, status.get("autoscaling"), utc_now())

        def change(_body: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
            now_raw = current.get("autoscaling") or {}
            return {} if without_nulls(now_raw) == without_nulls(wanted) else {"autoscaling": wanted}

        await patch_pool_status(rt.api, self.namespace, self.name, change)
        if st.replicas != workload_replicas(pool, status):
            await rt.api.apply(agent_statefulset(pool, rt.config, st.replicas))
        rt.metrics.observe(self.namespace, self.name, scale.signals, scale.event.value if scale.event else None)
        if scale.event is not None:
            logger.info("autoscaling %s: %s (%s)", self.name, scale.event.value, scale.reason)

    async def prune(self, finished: list[dict[str, Any]]) -> None:
        """Keep the newest KEEP_RECONFIGURATIONS finished Reconfigurations of the pool (all of them are finished
        when this runs); the pool's status keeps the epoch, so a deleted one's epoch is never needed again."""
        by_epoch = sorted(finished, key=lambda r: (r.get("spec") or {}).get("epoch") or 0)
        for old in by_epoch[:max(len(by_epoch) - KEEP_RECONFIGURATIONS, 0)]:
            await self.rt.api.delete(RECONFIGURATIONS, self.namespace, old["metadata"]["name"])

    async def ensure_topology(self, pool: ServingPool, status: Mapping[str, Any], groups: tuple[FormedGroup, ...],
                              epochs: list[int], logger: Log) -> None:
        rt, epoch = self.rt, pool_epoch(status)
        layers = status.get("modelLayers") or next(
            (s.num_layers for s in self.collector.statuses().values() if s.num_layers), None)
        desired = pool_topology(rt, self.namespace, self.name, pool.spec.model.name, workload_replicas(pool, status),
                                groups, epoch, layers, draining_replicas(status))
        current = await read_topology(rt.redis, self.name)
        if current is not None and (same_layout(current, desired) or int(current.get("epoch") or 0) > epoch):
            return
        if current is not None:  # the replicas changed: readers only take a newer epoch
            epoch = next_epoch(epoch, [*epochs, int(current.get("epoch") or 0)])
            desired["epoch"] = epoch
            new = epoch
            await patch_pool_status(rt.api, self.namespace, self.name,
                                    lambda _body, s: {"epoch": max(pool_epoch(s), new)})
        try:
            await write_topology(rt.redis, self.name, desired)
        except StaleTopologyError as exc:
            logger.warning("topology of %s not written: %s", self.name, exc)
            return
        logger.info("topology of %s published at epoch %d (%d replicas, %d groups)", self.name, epoch,
                    len(desired["replicas"]), len(groups))


async def run_pool_daemon(rt: Runtime, namespace: str, name: str, logger: Log) -> None:
    """Tick every plan_interval_s until cancelled; a failed round is logged (once per distinct error)."""
    c = rt.config
    async with PressureCollector(interval_ms=c.pressure_interval_ms, stale_after_s=c.stale_after_s,
                                 rpc_timeout_s=c.rpc_timeout_s) as collector:
        daemon = PoolDaemon(rt, namespace, name, collector)
        last_error = ""
        while True:
            try:
                if await daemon.tick(logger) is Tick.GONE:
                    rt.metrics.forget(namespace, name)
                    return
                last_error = ""
            except (KubeApiError, StatusConflictError, RedisError, OSError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                if error != last_error:
                    logger.warning("pressure round of %s/%s failed (next in %ss): %s", namespace, name,
                                   c.plan_interval_s, error)
                last_error = error
            await asyncio.sleep(c.plan_interval_s)
