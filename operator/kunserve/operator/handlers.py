"""kopf wiring of the operator: thin handlers, each calling one function of `reconcile`.

`register(registry, config)` adds to a kopf registry (`kunserve operator` uses kopf's default one, which
brings kopf's standard logins; the tests use their own with a login to the emulator):

- startup: kopf settings (own finalizer and annotation prefix, watch timeouts) and the
  `KubeApi` every handler shares (`OperatorContext`);
- ServingPool create / update of spec / resume (operator start) → `reconcile_pool`: server-side apply of
  the agents' StatefulSet + headless Service and the gateway's Deployment + Service, then status. An invalid
  spec gets Ready=False (phase Failed) with every problem in the message, and a Warning Event `InvalidSpec`;
  nothing is raised, so kopf does not retry a spec that only a person can fix (the next edit re-runs it);
- a timer per ServingPool (every `resync_interval_s`) → `reconcile_pool` again: repairs drift, such as a
  deleted Deployment, without waiting for the next edit (no Event: an invalid spec was reported already);
- StatefulSet events of the agents → `refresh_pool_status` (readyReplicas, phase, the Ready condition);
- ServingPool delete → `delete_pool_children`.

Deletion: every child carries an owner reference to its pool (controller, blockOwnerDeletion), so a real
cluster's garbage collector removes it even when the operator is not running. The delete handler also
deletes the children explicitly (kopf holds a finalizer until it has): teardown is ordered (gateway first,
so no new request reaches an agent being removed), does not depend on a garbage collector (kmock has
none), and leaves alone an object of the same name that this pool does not own. A pool deleted while
the operator is gone waits for it; `kubectl patch kpool NAME --type merge -p '{"metadata":{"finalizers":null}}'`
releases it and the garbage collector does the rest.

Elasticity (each a `register_*(registry, ctx)` called from `register` with the same `OperatorContext`, whose
`runtime` (kube_runtime.Runtime: API, Redis, agent clients) is made at startup and closed at cleanup):
- pressure daemon (pressure_handlers.py): `@kopf.daemon` per ServingPool — pressure collector → planner →
  creates a Reconfiguration (pressure_daemon.py);
- Reconfiguration handler (reconfiguration_handlers.py): `@kopf.on.create` / resume of reconfigurations → the
  executor (Prepare → Commit or Abort), which owns the pool's epoch / groups / Reconfiguring condition (see
  pool_status.py) and writes the topology to Redis (kube_runtime.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import kopf
from prometheus_client import start_http_server

from kunserve.operator.config import OperatorConfig
from kunserve.operator.kube import KopfKubeApi, KubeApi, KubeApiError
from kunserve.operator.kube_runtime import EndpointResolver, Runtime, dns_endpoint
from kunserve.operator.naming import LABEL_MANAGED_BY, LABEL_POOL, MANAGER
from kunserve.operator.pool_spec import GROUP, PLURAL, VERSION
from kunserve.operator.pressure_handlers import register_pressure
from kunserve.operator.reconcile import StatusConflictError, delete_pool_children, reconcile_pool, refresh_pool_status
from kunserve.operator.reconfiguration_handlers import register_reconfiguration

SERVINGPOOL = (GROUP, VERSION, PLURAL)
ANNOTATION_PREFIX = "operator.kunserve.io"
FINALIZER = "kunserve.io/operator"
RETRY_DELAY_S = 10.0


@dataclass(slots=True)
class OperatorContext:
    """What every handler shares: the operator's settings and, once kopf has started, the API client."""

    config: OperatorConfig
    api: KubeApi | None = None
    agent_endpoint: EndpointResolver = dns_endpoint  # where a pool's agent serves gRPC (tests point it elsewhere)
    rt: Runtime | None = None

    @property
    def kube(self) -> KubeApi:
        if self.api is None:
            raise RuntimeError("the operator has not started (no KubeApi yet)")
        return self.api

    @property
    def runtime(self) -> Runtime:
        if self.rt is None:
            raise RuntimeError("the operator has not started (no runtime yet)")
        return self.rt


def configure_settings(settings: kopf.OperatorSettings) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
    settings.watching.server_timeout = 600  # re-list every 10 minutes: no watch goes silently stale
    settings.watching.client_timeout = 660


async def unless_stopped(work: Coroutine[Any, Any, Any], stopped: kopf.DaemonStopped) -> None:
    """Run work, but cancel it as soon as kopf stops the timer (operator exit, pool deleted): a resync is
    idempotent and must not hold up a shutdown (kopf would wait for it, then orphan it)."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if not task.cancelled():
        task.result()  # re-raise what the work raised


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> OperatorContext:
    """Add the ServingPool handlers to registry; returns their shared context."""
    ctx = OperatorContext(config=config)

    @kopf.on.startup(registry=registry, id="kunserve-startup")
    async def startup(*, settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_settings(settings)
        ctx.api = KopfKubeApi(settings)
        ctx.rt = Runtime.create(ctx.config, ctx.api, ctx.agent_endpoint)
        if ctx.config.metrics_port is not None:  # kunserve_pool_* (autoscaling signals) for Prometheus, KEDA, HPA
            start_http_server(ctx.config.metrics_port, registry=ctx.rt.metrics.registry)

    @kopf.on.cleanup(registry=registry, id="kunserve-cleanup")
    async def cleanup(**_: Any) -> None:
        if ctx.rt is not None:
            await ctx.rt.close()
            ctx.rt = None

    @kopf.on.resume(*SERVINGPOOL, registry=registry, id="reconcile-resume", backoff=RETRY_DELAY_S)
    @kopf.on.create(*SERVINGPOOL, registry=registry, id="reconcile-create", backoff=RETRY_DELAY_S)
    @kopf.on.update(*SERVINGPOOL, registry=registry, id="reconcile-update", field="spec", backoff=RETRY_DELAY_S)
    async def pool_changed(*, body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        try:
            result = await reconcile_pool(ctx.kube, ctx.config, body, logger)
        except (KubeApiError, StatusConflictError) as exc:
            raise kopf.TemporaryError(str(exc), delay=RETRY_DELAY_S) from exc
        if result.invalid is not None:
            kopf.warn(body, reason="InvalidSpec", message=str(result.invalid))

    @kopf.timer(*SERVINGPOOL, registry=registry, id="resync", interval=config.resync_interval_s,
                initial_delay=config.resync_interval_s)
    async def pool_resync(*, body: kopf.Body, logger: kopf.Logger, **kwargs: Any) -> None:
        stopped: kopf.DaemonStopped = kwargs["stopped"]  # kopf gives timers `stopped` (not in its TimerFn type)
        try:
            await unless_stopped(reconcile_pool(ctx.kube, ctx.config, body, logger), stopped)
        except (KubeApiError, StatusConflictError) as exc:
            logger.warning("resync failed, next try in %ss: %s", config.resync_interval_s, exc)

    @kopf.on.delete(*SERVINGPOOL, registry=registry, id="delete-children", backoff=RETRY_DELAY_S)
    async def pool_deleted(*, name: str, namespace: str | None, uid: str, logger: kopf.Logger, **_: Any) -> None:
        try:
            await delete_pool_children(ctx.kube, namespace or "", name, uid, logger)
        except KubeApiError as exc:
            raise kopf.TemporaryError(str(exc), delay=RETRY_DELAY_S) from exc

    @kopf.on.event("apps", "v1", "statefulsets", registry=registry, id="agents-status",
                   labels={LABEL_MANAGED_BY: MANAGER, LABEL_POOL: kopf.PRESENT})
    async def agents_changed(*, namespace: str | None, labels: kopf.Labels, logger: kopf.Logger, **_: Any) -> None:
        try:  # event handlers are not retried: the next StatefulSet event (or pool change) refreshes again
            await refresh_pool_status(ctx.kube, namespace or "", labels[LABEL_POOL], logger)
        except (KubeApiError, StatusConflictError) as exc:
            logger.warning("could not refresh the status of pool %s: %s", labels[LABEL_POOL], exc)

    register_pressure(registry, ctx)
    register_reconfiguration(registry, ctx)
    return ctx
