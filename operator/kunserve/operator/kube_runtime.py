"""What the operator's reconfiguration machinery does in Kubernetes, as plain async functions (no kopf here).

- `Runtime`: what the pressure daemon and the Reconfiguration handler share: the API, Redis (the serving
  plane's topology), the agents' gRPC clients, how a replica's endpoint is found, one lock per pool.
- `handle_reconfiguration`: a Reconfiguration resource → checks (spec, pool, epoch newer than the pool's,
  members) → the executor, whose every step is saved in the resource's status (`KubeRecordStore`); on commit
  the topology goes to Redis and the pool's status gets the groups, epoch, modelLayers and
  lastReconfiguration; the pool's Reconfiguring condition is True while it runs. Re-running it on the same
  resource (operator restart, retry) resumes from its status instead of repeating.
- `pool_topology` / `publish_topology`: the topology document of a pool from its spec and recorded groups.

Ownership of a ServingPool's status fields: see pool_status.py (this module writes epoch, groups, groupCount,
modelLayers, lastReconfiguration and the Reconfiguring condition; every write is a merge patch of its own
fields carrying the resourceVersion, retried on conflict).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from kunserve.operator.agent_client import AgentClients
from kunserve.operator.autoscale_status import PoolMetrics
from kunserve.operator.config import OperatorConfig
from kunserve.operator.controller import replica_names
from kunserve.operator.executor import Executor, ExecutorSettings
from kunserve.operator.kube import RECONFIGURATIONS, SERVINGPOOLS, Conflict, KubeApi
from kunserve.operator.manifests import owner_reference
from kunserve.operator.naming import AGENT_GRPC_PORT, LABEL_MANAGED_BY, LABEL_POOL, MANAGER, agent_service_name
from kunserve.operator.pool_spec import (
    API_VERSION,
    InvalidServingPool,
    PoolRef,
    draining_replicas,
    workload_replicas,
)
from kunserve.operator.pool_status import RECONFIGURING, WorkloadStatus, compute_phase, set_condition
from kunserve.operator.reconcile import STATUS_WRITE_ATTEMPTS, StatusConflictError, utc_now
from kunserve.operator.reconfig import (
    FormedGroup,
    InvalidReconfiguration,
    ReconfigPhase,
    ReconfigRecord,
    ReconfigSpec,
    apply_committed,
    check_drop,
    groups_from_status,
    resolve_restore,
)
from kunserve.operator.topology_writer import ReplicaEndpoint, build_topology, write_topology
from kunserve.operator.validation import parse_pool

Log = logging.Logger | logging.LoggerAdapter[Any]
EndpointResolver = Callable[[str, str, str], str]  # (namespace, pool, replica) -> host:port
log = logging.getLogger(__name__)


def dns_endpoint(namespace: str, pool: str, replica: str) -> str:
    """An agent pod's gRPC endpoint through the pool's headless Service (replica = pod name)."""
    return f"{replica}.{agent_service_name(pool)}.{namespace}.svc:{AGENT_GRPC_PORT}"


@dataclass(slots=True)
class Runtime:
    config: OperatorConfig
    api: KubeApi
    redis: Redis
    clients: AgentClients
    endpoint: EndpointResolver = dns_endpoint
    clock: Callable[[], float] = time.time
    metrics: PoolMetrics = field(default_factory=PoolMetrics)  # the pools' autoscaling signals (/metrics)
    _locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)

    @classmethod
    def create(cls, config: OperatorConfig, api: KubeApi, endpoint: EndpointResolver = dns_endpoint) -> Runtime:
        redis = Redis.from_url(config.redis_url, socket_connect_timeout=3, socket_timeout=5,
                               health_check_interval=30)
        return cls(config=config, api=api, redis=redis, clients=AgentClients(config.rpc_timeout_s), endpoint=endpoint)

    def lock(self, namespace: str, pool: str) -> asyncio.Lock:
        """One reconfiguration at a time per pool (in this process; the daemon also waits for in-flight ones)."""
        return self._locks.setdefault((namespace, pool), asyncio.Lock())

    def executor(self) -> Executor:
        c = self.config
        return Executor(self.clients, ExecutorSettings(prepare_timeout_s=c.rpc_timeout_s,
                                                       commit_timeout_s=c.commit_timeout_s,
                                                       abort_timeout_s=c.rpc_timeout_s,
                                                       status_timeout_s=c.rpc_timeout_s), clock=self.clock)

    async def close(self) -> None:
        await self.clients.close()
        await self.redis.aclose()


# ------------------------------------------------------------------------------------------------ topology


def pool_replicas(rt: Runtime, namespace: str, pool: str, replicas: int,
                  groups: Sequence[FormedGroup]) -> list[ReplicaEndpoint]:
    """The pool's agents (and any group member beyond spec.replicas, which still serves its group)."""
    names = replica_names(pool, replicas)
    names += sorted({m for g in groups for m in g.members} - set(names))
    return [ReplicaEndpoint(n, rt.endpoint(namespace, pool, n)) for n in names]


def pool_topology(rt: Runtime, namespace: str, pool: str, model: str, replicas: int, groups: Sequence[FormedGroup],
                  epoch: int, num_layers: int | None, draining: Sequence[str] = ()) -> dict[str, Any]:
    return build_topology(epoch=epoch, model=model, replicas=pool_replicas(rt, namespace, pool, replicas, groups),
                          groups=groups, num_layers=num_layers, updated_at=rt.clock(), draining=draining)


async def patch_pool_status(api: KubeApi, namespace: str, name: str,
                            change: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]],
                            ) -> dict[str, Any] | None:
    """Write change(body, status) (only the fields that differ) with optimistic concurrency; None: no pool."""
    for _attempt in range(STATUS_WRITE_ATTEMPTS):
        body = await api.get(SERVINGPOOLS, namespace, name)
        if body is None:
            return None
        current = body.get("status") or {}
        changes = {k: v for k, v in change(body, current).items() if current.get(k) != v}
        if not changes:
            return {}
        patch = {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"]}, "status": changes}
        try:
            await api.patch(SERVINGPOOLS, namespace, name, patch, subresource="status")
        except Conflict:
            continue
        return changes
    raise StatusConflictError(f"could not write the status of {namespace}/{name} in {STATUS_WRITE_ATTEMPTS} tries")


def pool_epoch(status: Mapping[str, Any]) -> int:
    epoch = status.get("epoch")
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else 0


# ---------------------------------------------------------------------------------------- reconfigurations


@dataclass(slots=True)
class KubeRecordStore:
    """Saves an executor record as the Reconfiguration's status."""

    api: KubeApi
    namespace: str
    name: str
    generation: int

    async def save(self, record: ReconfigRecord) -> None:
        status = record.to_status() | {"observedGeneration": self.generation}
        await self.api.patch(RECONFIGURATIONS, self.namespace, self.name, {"status": status}, subresource="status")


def reconfiguration_manifest(spec: ReconfigSpec, name: str, pool: PoolRef) -> dict[str, Any]:
    """A Reconfiguration resource owned by its pool (deleted with it)."""
    return {"apiVersion": API_VERSION, "kind": "Reconfiguration",
            "metadata": {"name": name, "namespace": pool.namespace,
                         "labels": {LABEL_POOL: pool.name, LABEL_MANAGED_BY: MANAGER},
                         "ownerReferences": [owner_reference(pool) | {"controller": False}]},
            "spec": spec.to_cr_spec()}


async def set_reconfiguring(api: KubeApi, namespace: str, pool: str, active: bool, message: str,
                            reason: str, now: Callable[[], datetime.datetime] = utc_now) -> None:
    """The pool's Reconfiguring condition, and the phase it implies, in one write."""
    def change(body: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any]:
        generation = int((body.get("metadata") or {}).get("generation") or 0)
        conditions = set_condition(status.get("conditions") or [], RECONFIGURING, active, reason, message,
                                   generation, now())
        desired = (status.get("autoscaling") or {}).get("replicas") or (body.get("spec") or {}).get("replicas")
        workload = WorkloadStatus(replicas=int(status.get("replicas") or 0),
                                  ready_replicas=int(status.get("readyReplicas") or 0))
        phase = compute_phase(problem=None, desired=desired if isinstance(desired, int) else 0, workload=workload,
                              previous={**status, "conditions": conditions})
        return {"conditions": conditions, "phase": phase.value}

    await patch_pool_status(api, namespace, pool, change)


async def _fail(record: ReconfigRecord, store: KubeRecordStore, message: str, clock: Callable[[], float]
                ) -> ReconfigRecord:
    record.phase, record.message, record.completed_at = ReconfigPhase.FAILED, message, clock()
    await store.save(record)
    return record


async def handle_reconfiguration(rt: Runtime, body: Mapping[str, Any], logger: Log) -> ReconfigRecord:
    """Carry out (or resume) one Reconfiguration resource; returns its final record. Raises KubeApiError,
    StatusConflictError, OutcomeUnknownError and Redis errors for the caller to retry (resuming is safe)."""
    meta = body.get("metadata") or {}
    namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    record = ReconfigRecord.from_status(body.get("status"))
    if record.terminal:
        return record
    store = KubeRecordStore(rt.api, namespace, name, int(meta.get("generation") or 0))
    try:
        spec = ReconfigSpec.from_cr_spec(body.get("spec"))
    except InvalidReconfiguration as exc:
        return await _fail(record, store, f"invalid spec: {exc}", rt.clock)
    async with rt.lock(namespace, spec.pool):
        pool_body = await rt.api.get(SERVINGPOOLS, namespace, spec.pool)
        if pool_body is None or (pool_body.get("metadata") or {}).get("deletionTimestamp"):
            return await _fail(record, store, f"ServingPool {namespace}/{spec.pool} does not exist", rt.clock)
        status = pool_body.get("status") or {}
        try:
            pool = parse_pool(pool_body)
            groups = groups_from_status(status.get("groups"))
        except (InvalidServingPool, ValueError) as exc:
            if record.phase is ReconfigPhase.PENDING:
                return await _fail(record, store, f"ServingPool {spec.pool} cannot be reconfigured: {exc}", rt.clock)
            raise
        pending = record.phase is ReconfigPhase.PENDING
        if record.phase in (ReconfigPhase.PENDING, ReconfigPhase.PREPARING):
            try:
                spec = resolve_restore(spec, groups)
                if pending:
                    check_drop(spec, replica_names(spec.pool, workload_replicas(pool, status)), groups)
            except InvalidReconfiguration as exc:
                return await _fail(record, store, str(exc), rt.clock)
        endpoints = {m: rt.endpoint(namespace, spec.pool, m) for m in spec.members}
        await set_reconfiguring(rt.api, namespace, spec.pool, True, f"{name}: {spec.action.value} at epoch "
                                f"{spec.epoch}", spec.action.value)

        async def on_committed(committed: ReconfigSpec, done: ReconfigRecord) -> None:
            await commit_to_pool(rt, namespace, name, committed, done, pool.spec.model.name,
                                 workload_replicas(pool, status))

        record = await rt.executor().execute(spec, endpoints, record=record, store=store, on_committed=on_committed,
                                             current_epoch=pool_epoch(status) if pending else None)
        await set_reconfiguring(rt.api, namespace, spec.pool, False, f"{name}: {record.phase.value}",
                                record.phase.value)
        logger.info("reconfiguration %s (%s, epoch %d): %s %s", name, spec.action.value, spec.epoch,
                    record.phase.value, record.message)
        return record


async def commit_to_pool(rt: Runtime, namespace: str, name: str, spec: ReconfigSpec, record: ReconfigRecord,
                         model: str, replicas: int) -> None:
    """A committed reconfiguration's effects, idempotently: the topology in Redis (under its epoch), then the
    pool's groups, epoch, modelLayers and lastReconfiguration."""
    body = await rt.api.get(SERVINGPOOLS, namespace, spec.pool)
    status = (body or {}).get("status") or {}
    groups = apply_committed(groups_from_status(status.get("groups")), spec, record.committed_groups, name)
    num_layers = max((s.layer_end for g in spec.groups for s in g.stages), default=0) or None
    doc = pool_topology(rt, namespace, spec.pool, model, replicas, groups, spec.epoch, num_layers,
                        draining_replicas(status))
    await write_topology(rt.redis, spec.pool, doc)

    def change(_body: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
        now_groups = apply_committed(groups_from_status(current.get("groups")), spec, record.committed_groups, name)
        out: dict[str, Any] = {"epoch": max(pool_epoch(current), spec.epoch),
                               "groups": [g.to_status() for g in now_groups], "groupCount": len(now_groups),
                               "lastReconfiguration": name}
        if num_layers:
            out["modelLayers"] = num_layers
        return out

    await patch_pool_status(rt.api, namespace, spec.pool, change)
