"""An agent's part in reconfigurations: Prepare / Commit / Abort of a drop or restore, and the group steps
members run for each other (Join, Collect, Split, Disband).

Drop (leader's Commit): the leader pauses, drops its layers, asks every other member to Join (each drops
its layers, grows its pool and hands its requests over with their block tables), then schedules the
whole group (group.GroupLeader). Restore (leader's Commit): the leader drains its micro-batches and
pauses, every member Collects the KV of the requests it owns (all layers, from wherever they are) into
host memory, then every member Splits: loads the weights it prefetched in Prepare, rebuilds a pool for
every layer, takes its requests back and serves alone. Anything that fails before the commit point
leaves every member as it was (Abort); a member lost during the cooperative phase fails the group's
requests with a retryable error and every survivor restores itself from its local checkpoint.

Engine state is touched only on the engine thread (`self._on_engine`); gRPC calls run on the asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import grpc
import torch

from kunserve.agent import channels
from kunserve.agent.engine.block_manager import BlockManager
from kunserve.agent.engine.migration import MigratedRequest, adopt_request, read_kv_blocks, write_kv_blocks
from kunserve.agent.engine.output import RequestState
from kunserve.agent.engine.scheduler import Scheduler
from kunserve.agent.engine.sequence import Sequence, SequenceStatus
from kunserve.agent.engine_loop import HANDED_BACK, EngineLoop, GroupFailedError
from kunserve.agent.errors import KunServeError
from kunserve.agent.group import GroupLeader, GroupLostError, Stage
from kunserve.agent.layer_store import LayerStore
from kunserve.agent.stage import NO_STAGE, StageExecutor
from kunserve.agent.transport import GrpcTransport, pull_kv_blocks, sampling_to_proto
from kunserve.rpc.v1 import agent_pb2, agent_pb2_grpc, peer_pb2, peer_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")


class Role(Enum):
    REPLICA = agent_pb2.ROLE_REPLICA
    LEADER = agent_pb2.ROLE_LEADER
    STAGE = agent_pb2.ROLE_STAGE


class ReconfigurationError(KunServeError):
    """A reconfiguration step this agent refuses or could not complete; `code` is the gRPC status to answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True, frozen=True)
class StagePlan:
    agent_id: str
    endpoint: str
    start: int
    end: int


@dataclass(slots=True)
class Prepared:
    epoch: int
    action: int  # agent_pb2.Action
    stages: tuple[StagePlan, ...]
    weights: dict[str, torch.Tensor] | None = None  # restore: the missing weights, read in Prepare


def stages_from_proto(group: agent_pb2.GroupSpec) -> tuple[StagePlan, ...]:
    return tuple(StagePlan(s.agent_id, s.endpoint, s.layer_start, s.layer_end) for s in group.stages)


def stages_to_proto(stages: tuple[StagePlan, ...]) -> agent_pb2.GroupSpec:
    return agent_pb2.GroupSpec(stages=[agent_pb2.StageSpec(agent_id=s.agent_id, endpoint=s.endpoint,
                                                           layer_start=s.start, layer_end=s.end) for s in stages])


def check_stages(stages: tuple[StagePlan, ...], num_layers: int) -> str | None:
    """Why these stages are not a valid group of a num_layers model, or None."""
    if len(stages) < 2:
        return f"a group needs at least 2 stages, got {len(stages)}"
    if len({s.agent_id for s in stages}) != len(stages):
        return "a member appears twice in the group"
    expect = 0
    for s in stages:
        if s.start != expect or s.end <= s.start:
            return f"stage {s.agent_id} holds [{s.start}, {s.end}); stages must be contiguous non-empty ranges from 0"
        expect = s.end
    if expect != num_layers:
        return f"the stages end at layer {expect}, the model has {num_layers}"
    return None


class Member:
    def __init__(self, loop: EngineLoop, agent_id: str, endpoint: str, rpc_timeout_s: float = 30.0,
                 stream_timeout_s: float = 24 * 3600.0, depth: int = 2, exchange_bytes: int = 8 << 20,
                 restore_from: str = "checkpoint") -> None:
        """restore_from: where a restore reads the layers this agent dropped: "checkpoint" (the local host
        copy) or "peers" (pulled over the Peer service from the members that hold them)."""
        if restore_from not in ("checkpoint", "peers"):
            raise ValueError(f"restore_from must be checkpoint or peers, got {restore_from!r}")
        self.restore_from = restore_from
        self.loop, self.engine = loop, loop.engine
        self.agent_id, self.endpoint = agent_id, endpoint
        self.rpc_timeout_s, self.stream_timeout_s = rpc_timeout_s, stream_timeout_s
        self.depth, self.exchange_bytes = depth, exchange_bytes
        self.store = LayerStore(self.engine)
        self.role = Role.REPLICA
        self.epoch = 0
        self.stages: tuple[StagePlan, ...] = ()
        self.prepared: Prepared | None = None
        self.leader: GroupLeader | None = None
        self.executor: StageExecutor | None = None
        self.transport: GrpcTransport | None = None
        self.handoff: dict[str, asyncio.Queue[object]] = {}  # leader: outputs of requests other members follow
        self.relays: dict[str, asyncio.Task[None]] = {}  # a stage: requests it follows on the leader
        self.relay_tokens: dict[str, int] = {}  # their tokens so far (prompt + output): its home pressure
        self.collected: list[MigratedRequest] = []
        self.last_commit: agent_pb2.CommitResponse | None = None
        self.last_drop_s: float | None = None
        self.last_restore_s: float | None = None
        self.kv_bytes_in = 0
        self.remote_attention_served = 0
        self._remote_calls_before = 0  # made by executors of earlier groups
        self._lock = asyncio.Lock()
        self._io = ThreadPoolExecutor(2, thread_name_prefix="kv-exchange")
        self._watchdog: asyncio.Task[None] | None = None
        self.aio_loop: asyncio.AbstractEventLoop | None = None
        self.on_change: Callable[[Member], None] | None = None  # metrics hook
        loop.on_group_lost = self._group_lost

    # ---- helpers ---------------------------------------------------------------------------------------
    async def _on_engine(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.loop.call(fn))

    @property
    def stage_index(self) -> int:
        return next((i for i, s in enumerate(self.stages) if s.agent_id == self.agent_id), NO_STAGE)

    def _peer(self, endpoint: str) -> Any:
        return peer_pb2_grpc.PeerStub(channels.aio(endpoint))

    @property
    def remote_attention_calls(self) -> int:
        executor = self.leader.executor if self.leader is not None else self.executor
        return self._remote_calls_before + (executor.remote_calls if executor is not None else 0)

    def home_blocks_needed(self) -> int | None:
        """Blocks (every layer) the requests this agent owns need; None while it serves alone."""
        bs = self.engine.config.block_size
        if self.leader is not None:
            return self.leader.home_blocks_needed(self.agent_id)
        if self.role is Role.STAGE:
            return sum(-(-(n + 1) // bs) for n in list(self.relay_tokens.values()))
        return None

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    # ---- Agent.Prepare / Abort -------------------------------------------------------------------------
    async def prepare(self, req: agent_pb2.PrepareRequest) -> agent_pb2.PrepareResponse:
        self.aio_loop = asyncio.get_running_loop()
        stages = stages_from_proto(req.group)
        if req.action not in (agent_pb2.ACTION_DROP, agent_pb2.ACTION_RESTORE):
            raise ReconfigurationError(grpc.StatusCode.INVALID_ARGUMENT, "action must be DROP or RESTORE")
        p = self.prepared
        if p is not None and (p.epoch, p.action, p.stages) == (req.epoch, req.action, stages):
            return self._prepared_response(p)
        fail = grpc.StatusCode.FAILED_PRECONDITION
        async with self._lock:
            if req.epoch <= self.epoch:
                raise ReconfigurationError(fail, f"epoch {req.epoch} is not newer than committed epoch {self.epoch}")
            if p is not None and p.epoch >= req.epoch:
                raise ReconfigurationError(fail, f"epoch {p.epoch} is prepared already; abort it first")
            problem = check_stages(stages, self.engine.model_config.num_hidden_layers)
            if problem is None and all(s.agent_id != self.agent_id for s in stages):
                problem = f"agent {self.agent_id} is not a member of the group"
            if problem is None and req.action == agent_pb2.ACTION_DROP and self.role is not Role.REPLICA:
                problem = f"agent {self.agent_id} is already a stage of a group (epoch {self.epoch})"
            if problem is None and req.action == agent_pb2.ACTION_RESTORE and stages != self.stages:
                problem = "the group to restore is not the group this agent is in"
            if problem is not None:
                raise ReconfigurationError(fail, problem)
            await self._check_peers(stages, req.action)
            weights = None
            if req.action == agent_pb2.ACTION_RESTORE:
                names = await self._on_engine(self.store.missing_weight_names)
                read = self._pull_weights if self.restore_from == "peers" else self.engine.checkpoint.read_weights
                try:
                    weights = await asyncio.to_thread(read, names)
                except (KunServeError, OSError) as exc:
                    raise ReconfigurationError(fail, f"cannot read the weights to restore: {exc}") from exc
            self.prepared = Prepared(req.epoch, req.action, stages, weights)
            log.info("prepared epoch %d: %s %s", req.epoch, agent_pb2.Action.Name(req.action),
                     [(s.agent_id, s.start, s.end) for s in stages])
            return self._prepared_response(self.prepared)

    def _pull_weights(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named weights from the members holding them: a layer from its stage, the embedding from
        stage 0, the final norm and LM head from the last stage."""
        from kunserve.agent.peer import PeerWeightSource

        by_stage: dict[int, list[str]] = {}
        for name in names:
            if name.startswith("layers."):
                layer = int(name.split(".")[1])
                at = next(i for i, s in enumerate(self.stages) if s.start <= layer < s.end)
            else:
                at = 0 if name.startswith("embed_tokens") else len(self.stages) - 1
            by_stage.setdefault(at, []).append(name)
        weights: dict[str, torch.Tensor] = {}
        for at, wanted in by_stage.items():
            source = PeerWeightSource(self.stages[at].endpoint, self.rpc_timeout_s)
            weights.update(source.read_weights(wanted))
        return weights

    def _prepared_response(self, p: Prepared) -> agent_pb2.PrepareResponse:
        if p.weights is not None:
            delta = -sum(t.nbytes for t in p.weights.values())
        else:
            me = next(s for s in p.stages if s.agent_id == self.agent_id)
            layers = self.engine.model_config.num_hidden_layers
            delta = self.engine.weight_bytes * (layers - (me.end - me.start)) // layers
        return agent_pb2.PrepareResponse(agent_id=self.agent_id, epoch=p.epoch,
                                         kv_blocks_total=self.engine.block_manager.num_blocks, weight_bytes_delta=delta)

    async def _check_peers(self, stages: tuple[StagePlan, ...], action: int) -> None:
        async def status(s: StagePlan) -> None:
            try:
                st = await agent_pb2_grpc.AgentStub(channels.aio(s.endpoint)).Status(agent_pb2.StatusRequest(),
                                                                                    timeout=5.0)
            except grpc.aio.AioRpcError as exc:
                raise ReconfigurationError(grpc.StatusCode.FAILED_PRECONDITION,
                                           f"member {s.agent_id} at {s.endpoint} does not answer: "
                                           f"{exc.code().name}") from exc
            if st.agent_id != s.agent_id or st.num_layers != self.engine.model_config.num_hidden_layers:
                raise ReconfigurationError(grpc.StatusCode.FAILED_PRECONDITION,
                                           f"{s.endpoint} is agent {st.agent_id!r} with {st.num_layers} layers, "
                                           f"expected {s.agent_id!r} with the same model")
            if action == agent_pb2.ACTION_DROP and st.role != agent_pb2.ROLE_REPLICA:
                raise ReconfigurationError(grpc.StatusCode.FAILED_PRECONDITION,
                                           f"member {s.agent_id} is not serving as a replica")

        await asyncio.gather(*(status(s) for s in stages if s.agent_id != self.agent_id))

    def abort(self, epoch: int) -> bool:
        if self.prepared is not None and self.prepared.epoch == epoch:
            self.prepared = None
            log.info("aborted prepared epoch %d", epoch)
            return True
        return False

    # ---- Agent.Commit (the leader) ---------------------------------------------------------------------
    async def commit(self, epoch: int) -> agent_pb2.CommitResponse:
        if self.last_commit is not None and self.last_commit.epoch == epoch:
            return self.last_commit
        p = self.prepared
        fail = grpc.StatusCode.FAILED_PRECONDITION
        if p is None or p.epoch != epoch:
            raise ReconfigurationError(fail, f"epoch {epoch} is not prepared here")
        if p.stages[0].agent_id != self.agent_id:
            raise ReconfigurationError(fail, f"commit goes to the group's leader {p.stages[0].agent_id}")
        async with self._lock:
            t0 = time.perf_counter()
            if p.action == agent_pb2.ACTION_DROP:
                members = await self._commit_drop(p)
            else:
                members = await self._commit_restore(p)
            self.prepared = None
            self.last_commit = agent_pb2.CommitResponse(epoch=epoch, members=members,
                                                        seconds=time.perf_counter() - t0)
            self._changed()
            return self.last_commit

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

    # ---- restore ---------------------------------------------------------------------------------------
    async def _commit_restore(self, p: Prepared) -> list[agent_pb2.MemberResult]:
        leader = self.leader
        assert leader is not None and self.role is Role.LEADER
        t0 = time.perf_counter()
        await self._on_engine(lambda: setattr(leader, "draining", True))
        deadline = time.monotonic() + self.rpc_timeout_s
        while not await self._on_engine(lambda: leader.idle):
            if time.monotonic() > deadline:
                await self._on_engine(lambda: setattr(leader, "draining", False))
                raise ReconfigurationError(grpc.StatusCode.ABORTED, "the group did not drain its micro-batches")
            await asyncio.sleep(0.002)
        plan = await self._on_engine(self._restore_plan)
        t1 = time.perf_counter()
        try:
            await asyncio.gather(
                self.collect(p.epoch, plan.get(self.agent_id, [])),
                *(self._peer(s.endpoint).Collect(peer_pb2.CollectRequest(epoch=p.epoch, seqs=plan.get(s.agent_id, [])),
                                                 timeout=self.rpc_timeout_s) for s in p.stages[1:]))
        except Exception as exc:
            self.collected = []
            await self._on_engine(lambda: self._resume_group(leader))
            raise ReconfigurationError(grpc.StatusCode.ABORTED, f"restore of epoch {p.epoch} aborted: {exc}") from exc
        t2 = time.perf_counter()
        results = await asyncio.gather(
            self.split(p.epoch), *(self._peer(s.endpoint).Split(peer_pb2.SplitRequest(epoch=p.epoch),
                                                                timeout=self.rpc_timeout_s) for s in p.stages[1:]))
        log.info("restore of epoch %d: drain %.0f ms, collect %.0f ms, split %.0f ms", p.epoch, (t1 - t0) * 1e3,
                 (t2 - t1) * 1e3, (time.perf_counter() - t2) * 1e3)
        return [results[0], *(r.result for r in results[1:])]

    def _resume_group(self, leader: GroupLeader) -> None:
        leader.draining = False
        self.loop.driver = leader

    def _restore_plan(self) -> dict[str, list[peer_pb2.CollectSeq]]:
        """Engine thread: pause, and list every request by owner with where each layer's KV is."""
        leader = self.leader
        assert leader is not None
        self.loop.driver = None
        now = time.monotonic()
        plan: dict[str, list[peer_pb2.CollectSeq]] = {}
        members = {s.agent_id for s in self.stages}
        for rid, state in self.engine._requests.items():
            seq, g = state.seq, leader.seqs[rid]
            n = seq.num_computed_tokens
            where: dict[int, list[int]] = {}
            for st in leader.stages:
                for layer in range(st.start, st.end):
                    at = g.kv_stage if layer in g.pending else st.index
                    where.setdefault(at, []).append(layer)
            locations = [peer_pb2.KVLocation(endpoint=self.stages[at].endpoint, layers=layers,
                                             block_table=g.tables[at]) for at, layers in where.items()] if n else []
            owner = g.owner if g.owner in members else self.agent_id
            handed = peer_pb2.HandedRequest(
                request_id=rid, prompt_token_ids=seq.prompt_token_ids, output_token_ids=seq.output_token_ids,
                sampling=sampling_to_proto(seq.params), num_computed_tokens=n, owner=owner,
                age_s=now - seq.arrival_time)
            plan.setdefault(owner, []).append(peer_pb2.CollectSeq(request=handed, locations=locations))
        return plan

    async def collect(self, epoch: int, seqs: list[peer_pb2.CollectSeq]) -> int:
        """Restore step one on any member: copy the owned requests' KV (every layer) into host memory."""
        self._check_restore(epoch)

        def gather_all() -> tuple[list[MigratedRequest], int]:
            out, total = [], 0
            now = time.monotonic()
            for cs in seqs:
                h = cs.request
                kv: dict[int, torch.Tensor] = {}
                for loc in cs.locations:
                    table, layers = list(loc.block_table), list(loc.layers)
                    if loc.endpoint == self.endpoint:
                        got = read_kv_blocks(self.engine.kv_cache, table, h.num_computed_tokens, layers)
                        kv.update({k: v.cpu() for k, v in got.items()})
                    else:
                        kv.update(pull_kv_blocks(loc.endpoint, h.request_id, table, h.num_computed_tokens, layers,
                                                 self.rpc_timeout_s))
                total += sum(t.nbytes for t in kv.values())
                out.append(MigratedRequest(h.request_id, list(h.prompt_token_ids), list(h.output_token_ids),
                                           _sampling(h.sampling), h.num_computed_tokens, kv, now - h.age_s))
            return out, total

        self.collected, total = await asyncio.to_thread(gather_all)
        self.kv_bytes_in += total
        return total

    async def split(self, epoch: int) -> agent_pb2.MemberResult:
        """Restore step two on any member: weights back, a pool for every layer, own requests back."""
        self._check_restore(epoch)
        assert self.prepared is not None and self.prepared.weights is not None
        weights = self.prepared.weights
        result = await self._on_engine(lambda: self._split_here(weights))
        self.prepared, self.epoch = None, epoch
        self._changed()
        return result

    def _check_restore(self, epoch: int) -> None:
        p = self.prepared
        if self.role is Role.REPLICA or p is None or p.epoch != epoch or p.action != agent_pb2.ACTION_RESTORE:
            raise ReconfigurationError(grpc.StatusCode.FAILED_PRECONDITION, f"no restore of epoch {epoch} is prepared")

    def _split_here(self, weights: dict[str, torch.Tensor]) -> agent_pb2.MemberResult:
        t0 = time.perf_counter()
        e = self.engine
        self.loop.driver = None
        if self.leader is not None:
            for rid, g in list(self.leader.seqs.items()):
                if g.owner != self.agent_id:
                    sink = self.loop.untrack(rid)
                    if sink is not None:
                        sink(HANDED_BACK)
        self.store.install(weights)
        t1 = time.perf_counter()
        e.reset_pool(e.initial_num_blocks)
        t2 = time.perf_counter()
        for moved in self.collected:
            adopt_request(e, moved)
        log.info("split: weights %.0f ms, pool %.0f ms, %d requests back %.0f ms", (t1 - t0) * 1e3,
                 (t2 - t1) * 1e3, len(self.collected), (time.perf_counter() - t2) * 1e3)
        moved_n, self.collected = len(self.collected), []
        self._leave_group()
        self.last_restore_s = time.perf_counter() - t0
        return agent_pb2.MemberResult(agent_id=self.agent_id, layer_start=0, layer_end=e.model.end,
                                      kv_blocks_total=e.block_manager.num_blocks, seconds=self.last_restore_s,
                                      requests_moved=moved_n)

    def _leave_group(self) -> None:
        """Engine thread: serve alone again (the pool and weights are already whole)."""
        if self.transport is not None:
            self.transport.close()
        self._remote_calls_before = self.remote_attention_calls
        self.leader, self.executor, self.transport = None, None, None
        if self._watchdog is not None and self.aio_loop is not None:
            self.aio_loop.call_soon_threadsafe(self._watchdog.cancel)
            self._watchdog = None
        self.role, self.stages = Role.REPLICA, ()
        self.loop.driver = self.engine

    # ---- failure ---------------------------------------------------------------------------------------
    async def _disband_peer(self, endpoint: str, epoch: int, reason: str) -> None:
        await self._peer(endpoint).Disband(peer_pb2.DisbandRequest(epoch=epoch, reason=reason), timeout=10.0)

    async def disband(self, epoch: int, reason: str) -> int:
        """Leave the group whatever its state: fail what this agent follows, restore every layer locally."""
        if self.role is Role.REPLICA or epoch != self.epoch:
            return 0
        log.warning("disbanding group epoch %d: %s", epoch, reason)
        for task in list(self.relays.values()):
            task.cancel()
        self.relays.clear()
        names = await self._on_engine(self.store.missing_weight_names)
        weights = await asyncio.to_thread(self.engine.checkpoint.read_weights, names)

        def heal() -> int:
            failed = self.loop.fail_tracked(GroupFailedError(f"the group of epoch {epoch} is gone: {reason}"))
            if names:
                self.store.install(weights)
            self.engine.reset_pool(self.engine.initial_num_blocks)
            self._leave_group()
            return failed

        failed = await self._on_engine(heal)
        self._changed()
        return failed

    def _group_lost(self, exc: GroupLostError) -> None:
        """Engine thread (the leader's step failed): tell the other members, then restore this agent."""
        aio = self.aio_loop
        if aio is None:
            return
        epoch, others = self.epoch, [s.endpoint for s in self.stages[1:]]

        async def heal() -> None:
            await asyncio.gather(*(self._disband_peer(ep, epoch, str(exc)) for ep in others), return_exceptions=True)
            await self.disband(epoch, str(exc))

        asyncio.run_coroutine_threadsafe(heal(), aio)


def _sampling(msg: Any) -> Any:
    from kunserve.agent.service import sampling_from_proto

    return sampling_from_proto(msg)
