"""kopf wiring of Reconfiguration resources: create (and resume at operator start) → handle_reconfiguration.

The handler is re-run until the resource reaches a final phase: a temporary failure (API, Redis, a leader
whose commit outcome cannot be told yet) is retried after RETRY_DELAY_S, and every run resumes from the
resource's status, so a restarted operator neither repeats nor loses a reconfiguration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import kopf
from redis.exceptions import RedisError

from kunserve.operator.executor import OutcomeUnknownError
from kunserve.operator.kube import KubeApiError
from kunserve.operator.kube_runtime import handle_reconfiguration
from kunserve.operator.pool_spec import GROUP, VERSION
from kunserve.operator.reconcile import StatusConflictError
from kunserve.operator.reconfig import ReconfigPhase, ReconfigRecord
from kunserve.operator.topology_writer import StaleTopologyError

if TYPE_CHECKING:
    from kunserve.operator.handlers import OperatorContext

RECONFIGURATIONS = (GROUP, VERSION, "reconfigurations")
RETRY_DELAY_S = 5.0


def register_reconfiguration(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    @kopf.on.resume(*RECONFIGURATIONS, registry=registry, id="reconfigure-resume", backoff=RETRY_DELAY_S)
    @kopf.on.create(*RECONFIGURATIONS, registry=registry, id="reconfigure", backoff=RETRY_DELAY_S)
    async def reconfigure(*, body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        if ReconfigRecord.from_status(body.get("status")).terminal:
            return  # finished before (a resume at operator start): nothing to do, nothing to announce
        try:
            record = await handle_reconfiguration(ctx.runtime, body, logger)
        except (KubeApiError, StatusConflictError, OutcomeUnknownError, StaleTopologyError, RedisError,
                OSError) as exc:
            raise kopf.TemporaryError(f"{type(exc).__name__}: {exc}", delay=RETRY_DELAY_S) from exc
        if record.phase is ReconfigPhase.COMPLETED:
            kopf.info(body, reason="Completed", message=record.message[:1024])
        elif record.terminal:
            kopf.warn(body, reason=record.phase.value, message=record.message[:1024])
