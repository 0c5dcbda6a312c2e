"""In-process fake agents: the `Agent` gRPC service (Status, WatchPressure, Prepare, Commit, Abort) with a faithful
reconfiguration state machine, on 127.0.0.1, for the operator's tests.

State machine (agent.proto): Prepare checks the epoch is newer than the committed one, the action, the group
(>= 2 stages, contiguous ranges covering [0, L), the agent is a member, every peer answers; a drop needs a
replica, a restore the group the agent is in) and is idempotent for the same epoch and group; another epoch
prepared meanwhile is FAILED_PRECONDITION. Commit only on stage 0 and only when prepared (else
FAILED_PRECONDITION); the leader applies the new layout to every member (the Peer service's job, done here
directly on the other fakes of the same `FakeCluster`); a committed epoch's Commit answers the recorded
result again. Abort answers was_prepared. A drop grows the member's KV pool by the freed weight bytes.

Failure injection: `fail_prepare` / `fail_commit` (a gRPC status code name), `commit_gate` (Commit waits for
it; the work goes on even when the caller hangs up, as a real leader's would), `paused` (the pressure stream
stays open but sends nothing: the agent goes stale).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from kunserve.rpc.v1 import agent_pb2, agent_pb2_grpc

T = TypeVar("T")


@dataclass
class FakeLoad:
    blocks_needed: int = 0
    num_waiting: int = 0
    num_running: int = 0
    home_blocks_needed: int | None = None  # None: blocks_needed


@dataclass
class Prepared:
    epoch: int
    action: int
    stages: tuple[tuple[str, str, int, int], ...]  # (agent_id, endpoint, start, end)


@dataclass
class Counters:
    prepares: int = 0
    commit_calls: int = 0
    commits_applied: int = 0  # layout changes this agent led
    aborts: int = 0  # aborts that dropped a prepared epoch
    abort_calls: int = 0
    status_calls: int = 0
    watch_streams: int = 0


class FakeCluster:
    """The fakes that can reach each other (the leader drives members through it)."""

    def __init__(self) -> None:
        self.by_endpoint: dict[str, FakeAgent] = {}

    def add(self, agent_id: str, **kwargs: Any) -> FakeAgent:
        return FakeAgent(self, agent_id, **kwargs)

    async def start_all(self, *agents: FakeAgent) -> None:
        for a in agents:
            await a.start()

    async def stop_all(self) -> None:
        for a in list(self.by_endpoint.values()):
            await a.stop()


class FakeAgent(agent_pb2_grpc.AgentServicer):
    def __init__(self, cluster: FakeCluster, agent_id: str, *, model: str = "tiny", num_layers: int = 4,
                 layer_bytes: int = 1000, kv_bytes_per_token_layer: int = 10, block_size: int = 2,
                 pool_bytes: int = 8000) -> None:
        self.cluster = cluster
        self.agent_id = agent_id
        self.model = model
        self.num_layers = num_layers
        self.layer_bytes = layer_bytes
        self.kv_bytes_per_token_layer = kv_bytes_per_token_layer
        self.block_size = block_size
        self.pool_bytes = pool_bytes
        self.layer_start, self.layer_end = 0, num_layers
        self.epoch = 0
        self.role = agent_pb2.ROLE_REPLICA
        self.group: tuple[tuple[str, str, int, int], ...] = ()
        self.prepared: Prepared | None = None
        self.results: dict[int, agent_pb2.CommitResponse] = {}
        self.load = FakeLoad()
        self.paused = False
        self.fail_prepare: str | None = None
        self.fail_commit: str | None = None
        self.commit_gate: asyncio.Event | None = None
        self.counters = Counters()
        self.commit_log: list[int] = []  # epochs whose layout change this agent led, in order
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._closing = asyncio.Event()

    # ---- lifecycle ---------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int | None = None) -> None:
        """Serve on 127.0.0.1 (a free port the first time; the same port again on a restart)."""
        self._closing = asyncio.Event()
        server = grpc.aio.server()
        agent_pb2_grpc.add_AgentServicer_to_server(self, server)
        bound = server.add_insecure_port(f"127.0.0.1:{port if port is not None else self.port}")
        if bound == 0:
            raise RuntimeError(f"cannot bind 127.0.0.1:{self.port}")
        await server.start()
        self.port, self._server = bound, server
        self.cluster.by_endpoint[self.endpoint] = self

    async def stop(self) -> None:
        """Stop serving (streams end: a crash as the operator sees it); start() serves again on the same port."""
        self._closing.set()
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None

    def restart_state(self) -> None:
        """Forget everything, as a restarted process would."""
        self.layer_start, self.layer_end = 0, self.num_layers
        self.epoch, self.role, self.group, self.prepared, self.results = 0, agent_pb2.ROLE_REPLICA, (), None, {}

    # ---- memory ------------------------------------------------------------------------------------------
    @property
    def held_layers(self) -> int:
        return self.layer_end - self.layer_start

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.held_layers * self.kv_bytes_per_token_layer

    @property
    def blocks_total(self) -> int:
        return self.pool_bytes // self.block_bytes

    # ---- RPCs --------------------------------------------------------------------------------------------
    async def Status(self, request: agent_pb2.StatusRequest, context: Any) -> agent_pb2.StatusResponse:
        self.counters.status_calls += 1
        return agent_pb2.StatusResponse(
            agent_id=self.agent_id, model=self.model, num_layers=self.num_layers, layer_start=self.layer_start,
            layer_end=self.layer_end, block_size=self.block_size, kv_blocks_total=self.blocks_total,
            kv_blocks_free=max(self.blocks_total - self.load.blocks_needed, 0), kv_block_bytes=self.block_bytes,
            weight_bytes=self.held_layers * self.layer_bytes, memory_budget_bytes=self.pool_bytes * 2,
            epoch=self.epoch, role=self.role, device="cpu", group=_group(self.group),
            prepared_epoch=self.prepared.epoch if self.prepared else 0)

    async def WatchPressure(self, request: agent_pb2.WatchPressureRequest, context: Any
                            ) -> AsyncIterator[agent_pb2.Pressure]:
        self.counters.watch_streams += 1
        interval = max(10, request.interval_ms or 500) / 1000
        while not self._closing.is_set():
            if not self.paused:
                load = self.load
                home = load.home_blocks_needed if load.home_blocks_needed is not None else load.blocks_needed
                total = self.blocks_total
                yield agent_pb2.Pressure(
                    agent_id=self.agent_id, blocks_needed=load.blocks_needed, blocks_total=total,
                    blocks_free=max(total - load.blocks_needed, 0), num_waiting=load.num_waiting,
                    num_running=load.num_running, demand=load.blocks_needed / total if total else 0.0,
                    timestamp=0.0, epoch=self.epoch, role=self.role, home_blocks_needed=home)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), interval)

    async def Prepare(self, request: agent_pb2.PrepareRequest, context: Any) -> agent_pb2.PrepareResponse:
        self.counters.prepares += 1
        if self.fail_prepare:
            await context.abort(getattr(grpc.StatusCode, self.fail_prepare), "injected Prepare failure")
        stages = tuple((s.agent_id, s.endpoint, s.layer_start, s.layer_end) for s in request.group.stages)
        problem = self._check_prepare(request, stages)
        if problem is not None:
            code, text = problem
            await context.abort(code, text)
        self.prepared = Prepared(request.epoch, request.action, stages)
        delta = self._freed_for(stages)
        signed = delta if request.action == agent_pb2.ACTION_DROP else -delta
        return agent_pb2.PrepareResponse(agent_id=self.agent_id, epoch=request.epoch,
                                         kv_blocks_total=self.blocks_total, weight_bytes_delta=signed)

    def _check_prepare(self, request: agent_pb2.PrepareRequest,
                       stages: tuple[tuple[str, str, int, int], ...]) -> tuple[Any, str] | None:
        fp = grpc.StatusCode.FAILED_PRECONDITION
        if request.action not in (agent_pb2.ACTION_DROP, agent_pb2.ACTION_RESTORE):
            return grpc.StatusCode.INVALID_ARGUMENT, "action must be DROP or RESTORE"
        if request.epoch <= self.epoch:
            return fp, f"epoch {request.epoch} is not newer than the committed epoch {self.epoch}"
        if self.prepared is not None:
            if self.prepared.epoch == request.epoch and self.prepared.stages == stages \
                    and self.prepared.action == request.action:
                return None  # idempotent
            return fp, f"epoch {self.prepared.epoch} is prepared already"
        if len(stages) < 2:
            return fp, "a group needs at least 2 stages"
        expected = 0
        for _agent, _endpoint, start, end in stages:
            if start != expected or end <= start:
                return fp, "layer ranges are not contiguous from 0"
            expected = end
        if expected != self.num_layers:
            return fp, f"layer ranges do not cover the model's {self.num_layers} layers"
        if self.agent_id not in [s[0] for s in stages]:
            return fp, f"{self.agent_id} is not a member of the group"
        for _agent, endpoint, _start, _end in stages:
            peer = self.cluster.by_endpoint.get(endpoint)
            if peer is None or peer._server is None:
                return fp, f"peer {endpoint} does not answer"
        if request.action == agent_pb2.ACTION_DROP and self.role != agent_pb2.ROLE_REPLICA:
            return fp, f"{self.agent_id} is already in a group"
        if request.action == agent_pb2.ACTION_RESTORE and (
                self.role == agent_pb2.ROLE_REPLICA or self.group != stages):
            return fp, f"{self.agent_id} is not in that group"
        return None

    def _freed_for(self, stages: tuple[tuple[str, str, int, int], ...]) -> int:
        for agent, _endpoint, start, end in stages:
            if agent == self.agent_id:
                return (self.num_layers - (end - start)) * self.layer_bytes
        return 0

    async def Commit(self, request: agent_pb2.CommitRequest, context: Any) -> agent_pb2.CommitResponse:
        self.counters.commit_calls += 1
        if request.epoch in self.results:
            return self.results[request.epoch]
        prepared = self.prepared
        if prepared is None or prepared.epoch != request.epoch:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"epoch {request.epoch} is not prepared")
        assert prepared is not None
        if prepared.stages[0][0] != self.agent_id:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Commit goes to the group's leader (stage 0)")
        if self.fail_commit:
            for peer in self._members(prepared):
                peer.prepared = None  # the leader rolls every member back
            await context.abort(getattr(grpc.StatusCode, self.fail_commit), "injected Commit failure")
        # The work goes on even if the caller hangs up (a real leader finishes or rolls back on its own).
        return await asyncio.shield(self._apply(prepared))

    def _members(self, prepared: Prepared) -> list[FakeAgent]:
        return [self.cluster.by_endpoint[endpoint] for _a, endpoint, _s, _e in prepared.stages]

    async def _apply(self, prepared: Prepared) -> agent_pb2.CommitResponse:
        if self.commit_gate is not None:
            await self.commit_gate.wait()
        if prepared.epoch in self.results:
            return self.results[prepared.epoch]
        members = []
        for index, (peer, (_agent, _endpoint, start, end)) in enumerate(
                zip(self._members(prepared), prepared.stages, strict=True)):
            freed = (self.num_layers - (end - start)) * peer.layer_bytes
            if prepared.action == agent_pb2.ACTION_DROP:
                peer.layer_start, peer.layer_end, peer.pool_bytes = start, end, peer.pool_bytes + freed
                peer.group = prepared.stages
                peer.role = agent_pb2.ROLE_LEADER if index == 0 else agent_pb2.ROLE_STAGE
            else:
                peer.layer_start, peer.layer_end, peer.pool_bytes = 0, peer.num_layers, peer.pool_bytes - freed
                peer.group, peer.role = (), agent_pb2.ROLE_REPLICA
            peer.epoch, peer.prepared = prepared.epoch, None
            members.append(agent_pb2.MemberResult(agent_id=peer.agent_id, layer_start=peer.layer_start,
                                                  layer_end=peer.layer_end, kv_blocks_total=peer.blocks_total,
                                                  seconds=0.001, requests_moved=0))
        response = agent_pb2.CommitResponse(epoch=prepared.epoch, members=members, seconds=0.002)
        for peer in self._members(prepared):
            peer.results[prepared.epoch] = response
        self.counters.commits_applied += 1
        self.commit_log.append(prepared.epoch)
        return response

    async def Abort(self, request: agent_pb2.AbortReconfigurationRequest, context: Any
                    ) -> agent_pb2.AbortReconfigurationResponse:
        self.counters.abort_calls += 1
        was = self.prepared is not None and self.prepared.epoch == request.epoch
        if was:
            self.prepared = None
            self.counters.aborts += 1
        return agent_pb2.AbortReconfigurationResponse(was_prepared=was)


def _group(stages: tuple[tuple[str, str, int, int], ...]) -> agent_pb2.GroupSpec:
    return agent_pb2.GroupSpec(stages=[agent_pb2.StageSpec(agent_id=a, endpoint=e, layer_start=s, layer_end=t)
                                       for a, e, s, t in stages])


@dataclass
class FakeAgentsThread:
    """Fake agents served from a thread of their own (for sync tests next to kopf's thread)."""

    ids: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    cluster: FakeCluster = field(default_factory=FakeCluster)
    agents: dict[str, FakeAgent] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    def __enter__(self) -> FakeAgentsThread:
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=main, name="fake-agents", daemon=True)
        self._thread.start()
        ready.wait(5)

        async def start() -> None:
            for agent_id in self.ids:
                agent = self.cluster.add(agent_id, **self.options)
                await agent.start()
                self.agents[agent_id] = agent

        self.run(start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.run(self.cluster.stop_all())
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        assert self._loop is not None
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 5.0) -> T:
        async def wrapped() -> T:
            return fn()

        return self.run(wrapped(), timeout)

    def endpoints(self) -> dict[str, str]:
        return {a: agent.endpoint for a, agent in self.agents.items()}
