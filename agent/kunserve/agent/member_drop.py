"""Drop steps: the leader's commit of a drop, a later stage's Join, and a stage following the requests the
leader computes for it (relays), with the watchdog on its leader."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc

from kunserve.agent import channels
from kunserve.agent.engine.block_manager import BlockManager
from kunserve.agent.engine.migration import write_kv_blocks
from kunserve.agent.engine.output import RequestState
from kunserve.agent.engine.scheduler import Scheduler
from kunserve.agent.engine.sequence import Sequence, SequenceStatus
from kunserve.agent.engine_loop import GroupFailedError
from kunserve.agent.group import GroupLeader, Stage
from kunserve.agent.member_base import (
    MemberBase,
    Prepared,
    ReconfigurationError,
    Role,
    StagePlan,
    _sampling,
)
from kunserve.agent.stage import StageExecutor
from kunserve.agent.transport import GrpcTransport, pull_kv_blocks, sampling_to_proto
from kunserve.rpc.v1 import agent_pb2, agent_pb2_grpc, peer_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")


class DropSteps(MemberBase):
    async def _commit_drop(self, p: Prepared) -> list[agent_pb2.MemberResult]:
        me = p.stages[0]
        own = await self._on_engine(lambda: self._drop_here(me))
        own.requests_moved, own.requests_prefilling = await self._on_engine(self._own_requests)
        joined: list[peer_pb2.JoinResponse] = []
        try:
            results = await asyncio.gather(
                *(self._peer(s.endpoint).Join(peer_pb2.JoinRequest(epoch=p.epoch), timeout=self.rpc_timeout_s)
                  for s in p.stages[1:]), return_exceptions=True)
            joined = [r for r in results if isinstance(r, peer_pb2.JoinResponse)]
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
        except Exception as exc:
            # Roll back: members that joined restore themselves (their handed requests fail, retryably);
            # the leader takes its layers back and goes on with its own requests, which never moved.
            await asyncio.gather(*(self._disband_peer(s.endpoint, p.epoch, "drop rolled back")
                                   for s in p.stages[1:]), return_exceptions=True)
            await self._on_engine(self._undo_drop)
            self.prepared = None
            raise ReconfigurationError(grpc.StatusCode.ABORTED, f"drop of epoch {p.epoch} rolled back: {exc}") from exc
        await self._on_engine(lambda: self._become_leader(p, joined))
        self.epoch, self.stages, self.role = p.epoch, p.stages, Role.LEADER
        return [own, *(j.result for j in joined)]

    def _drop_here(self, me: StagePlan) -> agent_pb2.MemberResult:
        """Engine thread: stop stepping, drop to [start, end) and grow the pool by the freed bytes."""
        self.loop.driver = None
        self._full_blocks = self.engine.block_manager.num_blocks
        res = self.store.drop(me.start, me.end)
        self.last_drop_s = res.seconds
        return agent_pb2.MemberResult(agent_id=self.agent_id, layer_start=me.start, layer_end=me.end,
                                      kv_blocks_total=self.engine.block_manager.num_blocks, seconds=res.seconds)

    def _own_requests(self) -> tuple[int, int]:
        running = self.engine.scheduler.running
        prefilling = sum(0 < s.num_computed_tokens < s.num_prompt_tokens for s in running)
        return len(running) + len(self.engine.scheduler.waiting), prefilling

    def _undo_drop(self) -> None:
        self.store.restore()
        self.loop.driver = self.engine

    def _become_leader(self, p: Prepared, joined: list[peer_pb2.JoinResponse]) -> None:
        """Engine thread: build the group's accounting and scheduler, take every request, start stepping."""
        e = self.engine
        bs = e.config.block_size
        self.transport = GrpcTransport(p.epoch, [s.endpoint for s in p.stages], self.rpc_timeout_s)
        first = p.stages[0]
        stages = [Stage(0, self.agent_id, first.endpoint, first.start, first.end, e.block_manager, self._full_blocks)]
        for i, (plan, j) in enumerate(zip(p.stages[1:], joined, strict=True), start=1):
            mirror = BlockManager(j.kv_blocks_total, bs)
            mirror.mark_used([b for h in j.requests for b in h.block_table])
            stages.append(Stage(i, plan.agent_id, plan.endpoint, plan.start, plan.end, mirror, j.full_blocks))
        leader = GroupLeader(e, p.epoch, stages, self.transport, self._import_here, self.depth, self.exchange_bytes,
                             self.rpc_timeout_s)
        old = e.scheduler
        e.scheduler = leader.scheduler
        for seq in old.running:
            leader.track(seq, self.agent_id, seq.block_table if seq.num_computed_tokens else None, 0)
            leader.scheduler.running.append(seq)
        for seq in old.waiting:
            leader.track(seq, self.agent_id)
            leader.scheduler.waiting.append(seq)
        now = time.monotonic()
        for i, j in enumerate(joined, start=1):
            for h in j.requests:
                seq = Sequence(h.request_id, list(h.prompt_token_ids), _sampling(h.sampling),
                               token_ids=[*h.prompt_token_ids, *h.output_token_ids])
                seq.arrival_time = now - h.age_s
                seq.first_token_time = seq.arrival_time if h.output_token_ids else None
                seq.num_computed_tokens = h.num_computed_tokens
                e._requests[h.request_id] = RequestState(seq, e.tokenizer, e.eos_token_ids)
                leader.track(seq, h.owner, list(h.block_table) if h.num_computed_tokens else None, i)
                if h.num_computed_tokens:
                    seq.status = SequenceStatus.RUNNING
                    leader.scheduler.running.append(seq)
                else:
                    leader.scheduler.waiting.append(seq)
                self.loop.track(h.request_id, self._handoff_sink(h.request_id))
        self.leader = leader
        leader._reclaim_drained()
        self.loop.driver = leader
        log.info("leading group epoch %d: %d stages, %d requests", p.epoch, len(stages), len(e._requests))

    def _handoff_sink(self, request_id: str) -> Callable[[object], object]:
        queue: asyncio.Queue[object] = asyncio.Queue()
        self.handoff[request_id] = queue
        aio = self.aio_loop
        assert aio is not None, "set by prepare"
        return lambda item: aio.call_soon_threadsafe(queue.put_nowait, item)

    def _import_here(self, request_id: str, source: int, source_table: list[int], table: list[int],
                     num_tokens: int, layers: list[int]) -> Future[int]:
        endpoint = self.stages[source].endpoint if self.stages else ""
        return self._io.submit(self.import_kv, request_id, endpoint, source_table, table, num_tokens, layers)

    def import_kv(self, request_id: str, source: str, source_table: list[int], table: list[int], num_tokens: int,
                  layers: list[int]) -> int:
        """KV exchange, receiving side (any thread): pull the layers' KV and write it into `table` here."""
        kv = pull_kv_blocks(source, request_id, source_table, num_tokens, layers, self.rpc_timeout_s)
        n = write_kv_blocks(self.engine.kv_cache, table, kv)
        self.kv_bytes_in += n
        self._changed()
        return n

    # ---- Peer.Join (a later stage) -----------------------------------------------------------------------
    async def join(self, epoch: int) -> peer_pb2.JoinResponse:
        self.aio_loop = asyncio.get_running_loop()
        p = self.prepared
        if p is None or p.epoch != epoch or p.action != agent_pb2.ACTION_DROP:
            raise ReconfigurationError(grpc.StatusCode.FAILED_PRECONDITION, f"no drop of epoch {epoch} is prepared")
        async with self._lock:
            index = next(i for i, s in enumerate(p.stages) if s.agent_id == self.agent_id)
            resp = await self._on_engine(lambda: self._join_here(p, index))
            self.epoch, self.stages, self.role, self.prepared = p.epoch, p.stages, Role.STAGE, None
            self.applied = (p.epoch, p.action, p.stages)
            leader = self._peer(p.stages[0].endpoint)
            self._watchdog = asyncio.get_running_loop().create_task(self._watch_leader(epoch))
            for h in resp.requests:
                self.relay_tokens[h.request_id] = len(h.prompt_token_ids) + len(h.output_token_ids)
                self._start_relay(h.request_id, leader.Resume(peer_pb2.ResumeRequest(epoch=epoch,
                                  request_id=h.request_id), timeout=self.stream_timeout_s))
            self._changed()
            return resp

    def _join_here(self, p: Prepared, index: int) -> peer_pb2.JoinResponse:
        e = self.engine
        me = p.stages[index]
        result = self._drop_here(me)
        now = time.monotonic()
        handed = []
        for seq in [*e.scheduler.running, *e.scheduler.waiting]:
            table = list(seq.block_table) if seq.num_computed_tokens else []
            handed.append(peer_pb2.HandedRequest(
                request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids,
                output_token_ids=seq.output_token_ids, sampling=sampling_to_proto(seq.params),
                num_computed_tokens=seq.num_computed_tokens if table else 0, block_table=table,
                owner=self.agent_id, age_s=now - seq.arrival_time))
        e._requests.clear()
        e.scheduler = Scheduler(e.scheduler.config, e.block_manager)  # idle: the leader schedules now
        self.transport = GrpcTransport(p.epoch, [s.endpoint for s in p.stages], self.rpc_timeout_s)
        self.executor = StageExecutor(index, e.model, e.kv_cache, e.sampler, self.transport.remote_attention)
        result.requests_moved = len(handed)
        result.requests_prefilling = sum(0 < h.num_computed_tokens < len(h.prompt_token_ids) for h in handed)
        return peer_pb2.JoinResponse(result=result, kv_blocks_total=e.block_manager.num_blocks,
                                     full_blocks=self._full_blocks, requests=handed)

    async def _watch_leader(self, epoch: int, interval_s: float = 1.0, misses: int = 3) -> None:
        """A later stage checks that its leader is alive; a leader gone for `misses` checks in a row means
        the group is gone: this agent fails what it relays and restores itself."""
        missed = 0
        while self.role is Role.STAGE and self.epoch == epoch:
            await asyncio.sleep(interval_s)
            try:
                stub = agent_pb2_grpc.AgentStub(channels.aio(self.stages[0].endpoint))
                st = await stub.Status(agent_pb2.StatusRequest(), timeout=interval_s * 2)
                missed = 0 if st.epoch == epoch and st.role == agent_pb2.ROLE_LEADER else missed + 1
            except grpc.aio.AioRpcError:
                missed += 1
            if missed >= misses and self.role is Role.STAGE and self.epoch == epoch:
                self._watchdog = None  # this task: not cancelled by the disband it runs
                await self.disband(epoch, f"the group's leader {self.stages[0].agent_id} is gone")
                return

    def _start_relay(self, request_id: str, call: Any) -> None:
        """Follow a request the leader computes; its outputs go to the sink this agent holds for it."""

        async def relay() -> None:
            sink = await self._on_engine(lambda: self.loop.sink_of(request_id))
            try:
                async for msg in call:
                    if msg.handed_back:
                        return  # it goes on here after the split
                    if request_id in self.relay_tokens:
                        self.relay_tokens[request_id] += len(msg.token_ids)
                    if sink is not None:
                        sink(msg)
                    if msg.finish_reason:
                        await self._on_engine(lambda: self.loop.untrack(request_id))
                        return
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED:
                    return
                sink = await self._on_engine(lambda: self.loop.untrack(request_id))
                if sink is not None:
                    sink(GroupFailedError(f"request {request_id}: the group's leader failed: {exc.code().name}"))
            finally:
                self.relays.pop(request_id, None)
                self.relay_tokens.pop(request_id, None)

        self.relays[request_id] = asyncio.get_running_loop().create_task(relay())

    async def relay_new(self, request: Any, sink: Callable[[object], object]) -> None:
        """A request that reached this stage: the leader computes it, this agent keeps the client's stream."""
        await self._on_engine(lambda: self.loop.track(request.request_id, sink))
        prompt = request.text if request.WhichOneof("prompt") == "text" else None
        self.relay_tokens[request.request_id] = (
            len(self.engine.tokenizer.encode(prompt)) if prompt is not None else len(request.token_ids.ids))
        fwd = type(request)()
        fwd.CopyFrom(request)
        fwd.owner = self.agent_id
        stub = self._inference(self.stages[0].endpoint)
        self._start_relay(request.request_id, stub.Generate(fwd, timeout=self.stream_timeout_s))

    def _inference(self, endpoint: str) -> Any:
        from kunserve.rpc.v1 import inference_pb2_grpc

        return inference_pb2_grpc.InferenceStub(channels.aio(endpoint))

    async def abort_relayed(self, request_id: str) -> None:
        """The client of a relayed request went away: stop following it and abort it at the leader."""
        from kunserve.rpc.v1 import inference_pb2

        task = self.relays.pop(request_id, None)
        if task is not None:
            task.cancel()
        await self._on_engine(lambda: self.loop.untrack(request_id))
        if self.role is Role.STAGE and self.stages:
            try:
                await self._inference(self.stages[0].endpoint).Abort(
                    inference_pb2.AbortRequest(request_id=request_id), timeout=5.0)
            except grpc.aio.AioRpcError as exc:
                log.warning("abort of %s at the leader failed: %s", request_id, exc.code().name)

