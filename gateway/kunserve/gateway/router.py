"""Routing: the least-pressured replica that can admit.

Pressure is the agent's KV demand (blocks needed by its running and waiting requests / blocks in its
pool, from Agent.WatchPressure), plus the blocks of the requests this gateway sent it since that sample
and still has open (so a burst between two samples spreads instead of piling on one replica). A replica
admits unless it is DOWN or its waiting queue (the agent's count plus those unreflected requests) reached
`max_queue`. Replicas with fresh pressure rank before those whose pressure is unknown or stale; ties go
to fewer in-flight requests from this gateway. During a cooperative phase only a group's entry member
is routable (the topology's rule). Nothing admitting: 503 with Retry-After.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kunserve.gateway.errors import ServiceUnavailableError
from kunserve.gateway.replicas import Health, ReplicaRegistry, ReplicaState

log = logging.getLogger(__name__)
_HEALTH_RANK = {Health.UP: 0, Health.STALE: 1, Health.UNKNOWN: 1, Health.DOWN: 2}


@dataclass(slots=True, frozen=True)
class ReplicaView:
    """What routing knows about one replica at one instant."""

    id: str
    health: Health
    demand: float  # estimated KV demand
    queue: int  # estimated waiting requests
    inflight: int


def rank(views: Iterable[ReplicaView], max_queue: int, exclude: frozenset[str] = frozenset()) -> list[ReplicaView]:
    """Replicas that can admit, best first (pure: the whole routing policy)."""
    ok = [v for v in views if v.id not in exclude and v.health is not Health.DOWN and v.queue < max_queue]
    return sorted(ok, key=lambda v: (_HEALTH_RANK[v.health], round(v.demand, 6), v.queue, v.inflight, v.id))


def view_of(state: ReplicaState, stale_after_s: float, now: float) -> ReplicaView:
    health = state.health(stale_after_s, now)
    s = state.sample
    total = s.blocks_total if s is not None and s.blocks_total > 0 else 0
    sent_demand = state.sent_blocks_since_sample / total if total else 0.0
    demand = (s.demand if s is not None else 0.0) + sent_demand
    queue = (s.num_waiting if s is not None else 0) + state.sent_since_sample
    return ReplicaView(state.spec.id, health, demand, queue, state.inflight)


class Router:
    def __init__(self, registry: ReplicaRegistry, max_queue: int, stale_after_s: float, retry_after_s: int) -> None:
        self.registry = registry
        self.max_queue = max_queue
        self.stale_after_s = stale_after_s
        self.retry_after_s = retry_after_s

    def views(self) -> list[ReplicaView]:
        now = time.monotonic()
        return [view_of(s, self.stale_after_s, now) for s in self.registry.routable()]

    def pick(self, exclude: frozenset[str] = frozenset()) -> ReplicaState:
        """The best replica not in `exclude`; ServiceUnavailableError (503) when none admits."""
        views = self.views()
        ranked = rank(views, self.max_queue, exclude)
        if not ranked:
            raise ServiceUnavailableError(self._why(views, exclude), retry_after_s=self.retry_after_s)
        log.debug("routing to %s; candidates %s", ranked[0].id, ranked)
        return self.registry.replicas[ranked[0].id]

    @contextmanager
    def lease(self, state: ReplicaState, prompt_tokens: int) -> Iterator[ReplicaState]:
        """Count a request on `state` for as long as its stream is open."""
        blocks = math.ceil((prompt_tokens + 1) / max(1, state.block_size))
        seq = state.sample_seq
        state.inflight += 1
        state.sent_since_sample += 1
        state.sent_blocks_since_sample += blocks
        try:
            yield state
        finally:
            state.inflight -= 1
            if state.sample_seq == seq:  # no pressure message since it was sent: stop counting it
                state.sent_since_sample -= 1
                state.sent_blocks_since_sample -= blocks

    def _why(self, views: list[ReplicaView], exclude: frozenset[str]) -> str:
        if not views:
            return "no replica is available: the topology has no routable replica"
        parts = []
        for v in views:
            reason = ("failed for this request" if v.id in exclude else "down" if v.health is Health.DOWN
                      else f"queue full ({v.queue} waiting)")
            parts.append(f"{v.id}: {reason}")
        return "no replica is available (" + "; ".join(parts) + ")"
