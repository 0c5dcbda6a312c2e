"""The pressure collector: follows every agent's `Agent.WatchPressure` stream and keeps the latest sample.

One follower task per agent (so the work is bounded by the number of agents: each keeps only its latest
sample): `Status` first (model, KV block bytes, role and group, epoch), then the pressure stream. When the
stream breaks (agent restarted, network) the follower reconnects with capped exponential backoff and jitter;
a stream that reaches its deadline after delivering messages is re-opened at once (long-lived calls are
rotated so a half-dead connection cannot hide forever). `Status` is read again whenever the reported epoch
or role changes (a commit moved the agent in or out of a group).

An agent is *stale* once its last message is older than `stale_after_s` (or it never sent one): the planner
then leaves it out of new groups and holds any restore of its group.

    async with PressureCollector(interval_ms=200, stale_after_s=2.0) as collector:
        collector.set_targets({"agent-0": "127.0.0.1:50051", "agent-1": "127.0.0.1:50052"})
        await collector.wait_until(lambda c: len(c.snapshot()) == 2, timeout_s=10)
        pressures = collector.snapshot()      # list[ReplicaPressure] for the planner
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kunserve.operator.agent_client import AgentCallError, AgentClients, AgentRole, AgentStatus, PressureSample
from kunserve.operator.plan_types import ReplicaPressure
from kunserve.operator.planner import group_id_for

log = logging.getLogger(__name__)
GroupNamer = Callable[[str, tuple[str, ...]], str | None]


@dataclass(slots=True)
class AgentState:
    """What the collector knows about one agent."""

    agent_id: str  # the id the pool knows it by (pod name / local agent id)
    endpoint: str
    status: AgentStatus | None = None
    sample: PressureSample | None = None
    received_at: float | None = None  # collector clock of the last message
    connected: bool = False
    connects: int = 0  # streams that delivered at least one message
    failures: int = 0  # consecutive failed attempts
    last_error: str = ""
    task: asyncio.Task[None] | None = field(default=None, repr=False)


def to_replica_pressure(agent_id: str, status: AgentStatus, sample: PressureSample, *, stale: bool,
                        group: str | None) -> ReplicaPressure:
    """The planner's view of one agent. kv_pool_bytes = blocks x the agent's current block bytes; a replica's
    home need is its whole need; an agent that reports no role (older agent) has none."""
    if sample.role.grouped:
        home: int | None = sample.home_blocks_needed
    elif sample.role is AgentRole.REPLICA:
        home = sample.blocks_needed
    else:
        home = None
    return ReplicaPressure(
        name=agent_id, model=status.model, blocks_needed=max(sample.blocks_needed, 0),
        blocks_total=max(sample.blocks_total, 0), num_waiting=max(sample.num_waiting, 0),
        num_running=max(sample.num_running, 0), kv_pool_bytes=max(sample.blocks_total, 0) * status.kv_block_bytes,
        stale=stale, group=group if sample.role.grouped else None,
        home_blocks_needed=max(home, 0) if home is not None else None)


def default_group_namer(agent_id: str, members: tuple[str, ...]) -> str:
    """The planner's id for the group the agent reports (itself alone when it reports no members)."""
    return group_id_for(members or (agent_id,))


class PressureCollector:
    def __init__(self, clients: AgentClients | None = None, *, interval_ms: int = 500, stale_after_s: float = 5.0,
                 rpc_timeout_s: float = 5.0, backoff_initial_s: float = 0.1, backoff_max_s: float = 5.0,
                 stream_rotate_s: float = 300.0, group_namer: GroupNamer | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval_ms < 10 or stale_after_s <= 0 or backoff_initial_s <= 0 or backoff_max_s < backoff_initial_s:
            raise ValueError("need interval_ms >= 10, stale_after_s > 0 and 0 < backoff_initial_s <= backoff_max_s")
        self._own_clients = clients is None
        self.clients = clients or AgentClients(default_timeout_s=rpc_timeout_s)
        self.interval_ms = interval_ms
        self.stale_after_s = stale_after_s
        self.rpc_timeout_s = rpc_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stream_rotate_s = stream_rotate_s
        self.group_namer = group_namer or default_group_namer
        self.clock = clock
        self.agents: dict[str, AgentState] = {}
        self._changed = asyncio.Condition()
        self._closed = False

    async def __aenter__(self) -> PressureCollector:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- targets -----------------------------------------------------------------------------------------
    def set_targets(self, targets: Mapping[str, str]) -> None:
        """Follow exactly these agents (id -> host:port); call from the collector's event loop."""
        if self._closed:
            raise RuntimeError("the collector is closed")
        for agent_id, state in list(self.agents.items()):
            if targets.get(agent_id) != state.endpoint:
                self._stop(self.agents.pop(agent_id))
        for agent_id, endpoint in targets.items():
            if agent_id not in self.agents:
                state = AgentState(agent_id, endpoint)
                state.task = asyncio.create_task(self._follow(state), name=f"pressure-{agent_id}")
                self.agents[agent_id] = state

    def _stop(self, state: AgentState) -> None:
        if state.task is not None:
            state.task.cancel()

    async def close(self) -> None:
        """Stop every follower (bounded: they are cancelled) and close the channels if the collector owns them."""
        self._closed = True
        tasks = [s.task for s in self.agents.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.agents.clear()
        if self._own_clients:
            await self.clients.close()

    # ---- reading -----------------------------------------------------------------------------------------
    def is_stale(self, state: AgentState, now: float | None = None) -> bool:
        if state.received_at is None:
            return True
        return (self.clock() if now is None else now) - state.received_at > self.stale_after_s

    def snapshot(self, now: float | None = None) -> list[ReplicaPressure]:
        """The latest pressure of every agent that has reported at least once (stale ones marked), by id."""
        now = self.clock() if now is None else now
        out = []
        for agent_id in sorted(self.agents):
            state = self.agents[agent_id]
            if state.status is None or state.sample is None:
                continue
            group = self.group_namer(agent_id, state.status.group_members) if state.sample.role.grouped else None
            out.append(to_replica_pressure(agent_id, state.status, state.sample,
                                           stale=self.is_stale(state, now), group=group))
        return out

    def latest(self, agent_id: str, now: float | None = None) -> ReplicaPressure | None:
        """One agent's latest pressure (None before its first message)."""
        return next((p for p in self.snapshot(now) if p.name == agent_id), None)

    def serving_alone(self, now: float | None = None) -> dict[str, int]:
        """agent id -> epoch of every fresh agent whose latest message says it serves alone (role replica)."""
        now = self.clock() if now is None else now
        return {a: s.sample.epoch for a, s in self.agents.items()
                if s.sample is not None and s.sample.role is AgentRole.REPLICA and not self.is_stale(s, now)}

    def statuses(self) -> dict[str, AgentStatus]:
        """The last Status read from each agent."""
        return {a: s.status for a, s in self.agents.items() if s.status is not None}

    def fresh(self, now: float | None = None) -> list[str]:
        now = self.clock() if now is None else now
        return sorted(a for a, s in self.agents.items() if not self.is_stale(s, now))

    async def wait_until(self, predicate: Callable[[PressureCollector], Any], timeout_s: float) -> Any:
        """Wait (bounded) until predicate(self) is truthy after some message; returns its value."""
        async def waiting() -> Any:
            async with self._changed:
                while not (value := predicate(self)):
                    await self._changed.wait()
                return value

        return await asyncio.wait_for(waiting(), timeout_s)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ---- following one agent -----------------------------------------------------------------------------
    async def _follow(self, state: AgentState) -> None:
        backoff = self.backoff_initial_s
        while True:
            delivered = False
            try:
                state.status = await self.clients.status(state.endpoint, self.rpc_timeout_s)
                if state.status.agent_id and state.status.agent_id != state.agent_id:
                    log.warning("agent at %s calls itself %r, the pool knows it as %r", state.endpoint,
                                state.status.agent_id, state.agent_id)
                async for sample in self.clients.watch_pressure(state.endpoint, self.interval_ms,
                                                                self.stream_rotate_s):
                    status = state.status
                    if status is None or sample.epoch != status.epoch or (
                            sample.role is not status.role and sample.role is not AgentRole.UNSPECIFIED):
                        state.status = await self.clients.status(state.endpoint, self.rpc_timeout_s)
                    state.sample, state.received_at = sample, self.clock()
                    if not delivered:
                        delivered = True
                        state.connects += 1
                        if state.failures:
                            log.info("agent %s (%s) reports again", state.agent_id, state.endpoint)
                        state.connected, state.failures, backoff = True, 0, self.backoff_initial_s
                    await self._notify()
                state.last_error = "pressure stream ended"
            except AgentCallError as exc:
                if delivered and exc.code == "DEADLINE_EXCEEDED" and exc.method == "WatchPressure":
                    continue  # the stream's rotation deadline: re-open at once
                state.last_error = str(exc)
            state.connected = False
            state.failures += 1
            if state.failures == 1:
                log.warning("agent %s (%s): %s; reconnecting", state.agent_id, state.endpoint, state.last_error)
            await self._notify()
            await asyncio.sleep(backoff * (1 + random.random() / 4))
            backoff = min(backoff * 2, self.backoff_max_s)
