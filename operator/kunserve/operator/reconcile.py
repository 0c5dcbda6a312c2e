"""What the ServingPool handlers do, as plain async functions over a `KubeApi` (no kopf in here).

- `reconcile_pool`: validate the pool; when valid, server-side-apply its children; then refresh status.
  An invalid spec changes nothing it already runs (a typo must not tear down a serving pool) and is
  reported as Ready=False / phase Failed with the reasons.
- `refresh_pool_status`: recompute the status fields `pool_status` owns from the pool and its agents'
  StatefulSet, and write what changed (optimistic concurrency, bounded retries).
- `delete_pool_children`: delete what the pool owns, explicitly (see handlers.py for why both this and
  owner references).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kunserve.operator.config import OperatorConfig
from kunserve.operator.kube import DEPLOYMENTS, SERVICES, SERVINGPOOLS, STATEFULSETS, Conflict, KubeApi, ResourceKind
from kunserve.operator.manifests import pool_children
from kunserve.operator.naming import agent_service_name, agent_statefulset_name, gateway_name
from kunserve.operator.pool_spec import InvalidServingPool, ServingPool, workload_replicas
from kunserve.operator.pool_status import WorkloadStatus, pool_status, status_changes
from kunserve.operator.validation import parse_pool

Clock = Callable[[], datetime.datetime]
Log = logging.Logger | logging.LoggerAdapter[Any]
STATUS_WRITE_ATTEMPTS = 5


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class StatusConflictError(RuntimeError):
    """The pool kept changing under every status write (the caller's framework retries later)."""


@dataclass(slots=True, frozen=True)
class ReconcileResult:
    pool: ServingPool | None  # None when the spec is invalid
    invalid: InvalidServingPool | None
    applied: tuple[str, ...]  # "Kind/name" of every child applied


def validate(body: Mapping[str, Any]) -> tuple[ServingPool | None, InvalidServingPool | None]:
    try:
        return parse_pool(body), None
    except InvalidServingPool as exc:
        return None, exc


async def reconcile_pool(api: KubeApi, config: OperatorConfig, body: Mapping[str, Any],
                         logger: Log, clock: Clock = utc_now) -> ReconcileResult:
    pool, invalid = validate(body)
    applied: list[str] = []
    if pool is not None:
        meta = body.get("metadata") or {}
        status = body.get("status")
        if pool.spec.autoscaling is not None:  # the autoscaler's count, as recorded now (kopf's body may lag)
            latest = await api.get(SERVINGPOOLS, str(meta.get("namespace")), str(meta.get("name")))
            status = (latest or body).get("status")
        for manifest in pool_children(pool, config, workload_replicas(pool, status)):
            await api.apply(manifest)
            applied.append(f"{manifest['kind']}/{manifest['metadata']['name']}")
        logger.info("applied %s", ", ".join(applied))
    else:
        logger.warning("invalid ServingPool, its workloads are left as they are: %s", invalid)
    meta = body.get("metadata") or {}
    await refresh_pool_status(api, str(meta.get("namespace")), str(meta.get("name")), logger, clock)
    return ReconcileResult(pool=pool, invalid=invalid, applied=tuple(applied))


async def refresh_pool_status(api: KubeApi, namespace: str, name: str, logger: Log,
                              clock: Clock = utc_now) -> dict[str, Any] | None:
    """Write the status fields that changed; returns them (None: no pool, or it is being deleted)."""
    for _attempt in range(STATUS_WRITE_ATTEMPTS):
        body = await api.get(SERVINGPOOLS, namespace, name)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return None
        pool, invalid = validate(body)
        sts = await api.get(STATEFULSETS, namespace, agent_statefulset_name(name))
        current = body.get("status") or {}
        wanted = pool_status(
            name=name, generation=int((body.get("metadata") or {}).get("generation") or 0),
            desired=workload_replicas(pool, current) if pool is not None else 0,
            problem=str(invalid) if invalid is not None else None,
            workload=WorkloadStatus.from_statefulset(sts), previous=current, now=clock())
        changes = status_changes(current, wanted)
        if not changes:
            return {}
        patch = {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"]}, "status": changes}
        try:
            await api.patch(SERVINGPOOLS, namespace, name, patch, subresource="status")
        except Conflict:
            logger.debug("status of %s/%s changed while writing it; recomputing", namespace, name)
            continue
        return changes
    raise StatusConflictError(f"could not write the status of {namespace}/{name} in {STATUS_WRITE_ATTEMPTS} tries")


def owned_children(name: str) -> list[tuple[ResourceKind, str]]:
    """What a pool owns, in deletion order: traffic first (gateway), then the agents."""
    return [(DEPLOYMENTS, gateway_name(name)), (SERVICES, gateway_name(name)),
            (STATEFULSETS, agent_statefulset_name(name)), (SERVICES, agent_service_name(name))]


def owned_by(body: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in (body.get("metadata") or {}).get("ownerReferences") or [])


async def delete_pool_children(api: KubeApi, namespace: str, name: str, uid: str,
                               logger: Log) -> list[str]:
    """Delete every child the pool (uid) owns; returns "plural/name" of those deleted. An object of the same
    name that the pool does not own is left alone (and logged)."""
    deleted = []
    for kind, child in owned_children(name):
        body = await api.get(kind, namespace, child)
        if body is None:
            continue
        if uid and not owned_by(body, uid):
            logger.warning("%s/%s is not owned by this pool; leaving it", kind.plural, child)
            continue
        if await api.delete(kind, namespace, child):
            deleted.append(f"{kind.plural}/{child}")
    logger.info("deleted %s", ", ".join(deleted) or "nothing (already gone)")
    return deleted
