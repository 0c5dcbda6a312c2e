"""kopf wiring of the pressure daemon: one per ServingPool (see pressure_daemon.py for what it does).

kopf starts it when the operator sees a pool (created or existing) and cancels it when the pool is deleted
or the operator stops; the daemon's state is in the API (the pool's status, the Reconfigurations), so a new
daemon picks up where the last one stopped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import kopf

from kunserve.operator.pool_spec import GROUP, PLURAL, VERSION
from kunserve.operator.pressure_daemon import run_pool_daemon

if TYPE_CHECKING:
    from kunserve.operator.handlers import OperatorContext


def register_pressure(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    @kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, id="pressure", cancellation_timeout=5.0)
    async def pressure(*, name: str, namespace: str | None, logger: kopf.Logger, **_: Any) -> None:
        await run_pool_daemon(ctx.runtime, namespace or "", name, logger)
