"""Migration service: move one request, with its KV, to another replica (Llumnix-style; see migration.proto).

The KV-centric migration baseline of the burst benchmark. It is separate from KunServe's reconfiguration:
an agent leading or serving in a cooperative group refuses it. The source detaches the request between
two engine steps (its blocks stay allocated, so the KV is stable), the target pulls the KV over
Peer.PullKV (block-table form), adopts it with `migration.adopt_request`, and streams the outputs back;
the source frees the blocks and relays those outputs into the client's open Generate stream. If the
client goes away meanwhile, the target still runs the request to its end (bounded by max_tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from kunserve.agent.engine.migration import MigratedRequest, adopt_request
from kunserve.agent.engine.output import RequestOutput, RequestState
from kunserve.agent.engine.sequence import SamplingParams, Sequence, SequenceStatus
from kunserve.agent.engine_loop import EngineLoop, EngineStoppedError, Sink
from kunserve.agent.errors import InvalidRequestError, PoolError
from kunserve.agent.service import output_to_proto, sampling_from_proto
from kunserve.rpc.options import message_limits
from kunserve.rpc.tensors import assemble_chunks
from kunserve.rpc.v1 import inference_pb2, migration_pb2, migration_pb2_grpc, peer_pb2, peer_pb2_grpc


def sampling_to_proto(p: SamplingParams) -> inference_pb2.SamplingParams:
    msg = inference_pb2.SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                                       top_k=p.top_k, stop=list(p.stop), stop_token_ids=list(p.stop_token_ids),
                                       ignore_eos=p.ignore_eos, sample_index_offset=p.sample_index_offset)
    if p.seed is not None:
        msg.seed = p.seed
    return msg


@dataclass(slots=True)
class Detached:
    state: RequestState
    sink: Sink | None
    was_running: bool

    @property
    def seq(self) -> Sequence:
        return self.state.seq


class MigrationServicer(migration_pb2_grpc.MigrationServicer):
    def __init__(self, loop: EngineLoop, endpoint: str = "", rpc_timeout_s: float = 60.0) -> None:
        self.loop = loop
        self.endpoint = endpoint
        self.rpc_timeout_s = rpc_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._relays: set[asyncio.Task[None]] = set()

    def _channel(self, target: str) -> grpc.aio.Channel:
        ch = self._channels.get(target)
        if ch is None:
            ch = self._channels[target] = grpc.aio.insecure_channel(target, options=message_limits())
        return ch

    # ---- engine-thread steps ----------------------------------------------------------------------------
    def _detach(self, request_id: str) -> Detached:
        loop, engine = self.loop, self.loop.engine
        if loop.driver is not engine:
            raise InvalidRequestError("this agent is in a cooperative group: requests do not migrate")
        seq = engine.sequence(request_id)
        state = engine._requests.pop(request_id)
        running = seq.status is SequenceStatus.RUNNING
        if running:
            engine.scheduler.running.remove(seq)
        else:
            engine.scheduler.waiting.remove(seq)
        return Detached(state, loop.untrack(request_id), running)

    def _reattach(self, d: Detached) -> None:
        engine = self.loop.engine
        engine._requests[d.seq.request_id] = d.state
        if d.was_running:
            engine.scheduler.running.append(d.seq)
        else:
            engine.scheduler.waiting.appendleft(d.seq)
        if d.sink is not None:
            self.loop.track(d.seq.request_id, d.sink)

    def _release(self, d: Detached) -> None:
        self.loop.engine.block_manager.free(d.seq.block_table)
        d.seq.status = SequenceStatus.FINISHED

    async def _on_engine(self, fn):  # type: ignore[no-untyped-def]
        return await asyncio.wrap_future(self.loop.call(fn))

    # ---- the source ---------------------------------------------------------------------------------------
    async def MigrateOut(self, request: migration_pb2.MigrateOutRequest, context: grpc.aio.ServicerContext
                         ) -> migration_pb2.MigrateOutResponse:
        if not request.request_id or not request.target:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id and target are required")
        t0 = time.monotonic()
        try:
            d: Detached = await self._on_engine(lambda: self._detach(request.request_id))
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except EngineStoppedError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        seq = d.seq
        n = seq.num_computed_tokens
        adopt = migration_pb2.AdoptRequest(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids, output_token_ids=seq.output_token_ids,
            sampling=sampling_to_proto(seq.params), num_computed_tokens=n, source=self.endpoint,
            source_table=seq.block_table if n else [])
        stream = migration_pb2_grpc.MigrationStub(self._channel(request.target)).Adopt(adopt)
        try:
            await stream.read()  # the target's confirmation
        except grpc.aio.AioRpcError as exc:
            stream.cancel()
            await self._on_engine(lambda: self._reattach(d))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{request.target} did not adopt {seq.request_id}: {exc.code().name}: {exc.details()}")
        await self._on_engine(lambda: self._release(d))
        task = asyncio.ensure_future(self._relay(stream, d.sink, seq.request_id))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)
        kv_bytes = n * self.loop.engine.kv_cache.block_bytes // self.loop.engine.config.block_size
        return migration_pb2.MigrateOutResponse(num_tokens=n, kv_bytes=kv_bytes, seconds=time.monotonic() - t0)

    async def _relay(self, stream: grpc.aio.UnaryStreamCall, sink: Sink | None, request_id: str) -> None:
        try:  # read() only: a call read once with read() cannot be iterated with `async for`
            while True:
                msg = await stream.read()
                if msg is grpc.aio.EOF:
                    raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                               grpc.aio.Metadata(), "stream ended before the request finished")
                if sink is not None:
                    sink(msg)
                if msg.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
                    return
        except grpc.aio.AioRpcError as exc:
            if sink is not None:
                sink(EngineStoppedError(f"request {request_id}: the agent it migrated to failed: {exc.details()}"))

    # ---- the target ---------------------------------------------------------------------------------------
    async def Adopt(self, request: migration_pb2.AdoptRequest, context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        engine, n = self.loop.engine, request.num_computed_tokens
        rid = request.request_id
        kv = {}
        if n:
            need = engine.block_manager.blocks_for(n + 1)
            if self.loop.driver is not engine or engine.block_manager.num_free_blocks < need:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no room for {need} blocks of {rid}")
            pull = peer_pb2.PullKVRequest(request_id=rid, layers=engine.model.held_layers(),
                                          block_table=list(request.source_table), num_tokens=n)
            try:
                chunks = [c async for c in peer_pb2_grpc.PeerStub(self._channel(request.source)).PullKV(
                    pull, timeout=self.rpc_timeout_s)]
            except grpc.aio.AioRpcError as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"pulling KV of {rid}: {exc.details()}")
            kv = {int(name.split(".")[1]): t for name, t in assemble_chunks(chunks).items()}
        moved = MigratedRequest(rid, list(request.prompt_token_ids), list(request.output_token_ids),
                                sampling_from_proto(request.sampling), n, kv)
        outputs: asyncio.Queue[object] = asyncio.Queue()
        aio_loop = asyncio.get_running_loop()

        def sink(item: object) -> None:
            aio_loop.call_soon_threadsafe(outputs.put_nowait, item)

        def adopt() -> None:
            if self.loop.driver is not engine:
                raise PoolError("this agent is in a cooperative group")
            adopt_request(engine, moved)
            self.loop.track(rid, sink)

        try:
            await self._on_engine(adopt)
        except (PoolError, InvalidRequestError) as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except EngineStoppedError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        yield inference_pb2.GenerateResponse(request_id=rid)
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                if isinstance(out, EngineStoppedError):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(out))
                    return
                assert isinstance(out, RequestOutput)
                finished = out.finished
                if out.new_token_ids or finished:
                    yield output_to_proto(out, False)
        finally:
            if not finished:
                self.loop.abort(rid)

    async def close(self) -> None:
        for task in list(self._relays):
            task.cancel()
        for ch in self._channels.values():
            with contextlib.suppress(Exception):
                await ch.close()
