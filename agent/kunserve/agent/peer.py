"""Peer service (weights and KV as chunked tensor streams between agents) and its client side.

The transport seam: PeerWeightSource and pull_kv are the only places that move tensors between agents;
an NCCL or RDMA transport would implement the same two calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING

import grpc
import torch

from kunserve.agent import channels
from kunserve.agent.engine.migration import read_kv, read_kv_blocks
from kunserve.agent.engine.output import RequestOutput
from kunserve.agent.engine_loop import EngineLoop, EngineStoppedError, HandedBack
from kunserve.agent.errors import InvalidRequestError, KunServeError
from kunserve.rpc.tensors import assemble_chunks, iter_chunks, tensor_from_proto, tensor_to_proto
from kunserve.rpc.v1 import inference_pb2, peer_pb2, peer_pb2_grpc, tensor_pb2

if TYPE_CHECKING:
    from kunserve.agent.member import Member

DEFAULT_CHUNK_BYTES = 1 << 20


class PeerError(KunServeError):
    """A peer could not supply what was asked (unreachable, or it does not hold it)."""


def _chunks(tensors: dict[str, torch.Tensor], chunk_bytes: int) -> Iterable[tensor_pb2.TensorChunk]:
    for name, tensor in tensors.items():
        yield from iter_chunks(name, tensor, chunk_bytes or DEFAULT_CHUNK_BYTES)


class PeerServicer(peer_pb2_grpc.PeerServicer):
    def __init__(self, loop: EngineLoop, member: Member | None = None) -> None:
        self.loop = loop
        self.member = member

    async def _on_engine(self, fn, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        try:
            return await asyncio.wrap_future(self.loop.call(fn))
        except (InvalidRequestError, KeyError) as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc).strip("'\""))
        except EngineStoppedError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def PullWeights(
        self, request: peer_pb2.PullWeightsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tensor_pb2.TensorChunk]:
        if not request.names:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "names must be non-empty")
        names = list(request.names)

        def held() -> dict[str, torch.Tensor]:
            state = self.loop.engine.model.state_dict()
            missing = [n for n in names if n not in state]
            if missing:
                raise KeyError(f"this agent does not hold {missing}")
            return {n: state[n] for n in names}  # references: weights are replaced, never written in place

        tensors = await self._on_engine(held, context)
        for chunk in _chunks(tensors, request.chunk_bytes):
            yield chunk

    async def PullKV(
        self, request: peer_pb2.PullKVRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tensor_pb2.TensorChunk]:
        if not request.layers:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "layers must be non-empty")
        layers = list(request.layers)
        if request.block_table:  # blocks a group's leader assigned here: read them off the engine thread
            table, n = list(request.block_table), request.num_tokens
            try:
                kv = await asyncio.to_thread(read_kv_blocks, self.loop.engine.kv_cache, table, n, layers)
            except InvalidRequestError as exc:
                await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        else:
            kv = await self._on_engine(lambda: read_kv(self.loop.engine, request.request_id, layers), context)
        for chunk in _chunks({f"kv.{layer}": t for layer, t in kv.items()}, request.chunk_bytes):
            yield chunk

    # ---- the group -------------------------------------------------------------------------------------
    async def _member(self, context: grpc.aio.ServicerContext, epoch: int | None = None) -> Member:
        m = self.member
        if m is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this agent runs without reconfiguration")
        assert m is not None
        if epoch is not None and epoch != m.epoch:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"epoch {epoch} is not this agent's epoch {m.epoch}")
        return m

    async def _guard(self, context: grpc.aio.ServicerContext, coro):  # type: ignore[no-untyped-def]
        from kunserve.agent.member import ReconfigurationError

        try:
            return await coro
        except ReconfigurationError as exc:
            await context.abort(exc.code, str(exc))
        except EngineStoppedError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def Forward(self, request: peer_pb2.StageBatch, context: grpc.aio.ServicerContext) -> peer_pb2.StageResult:
        from kunserve.agent.service import sampling_from_proto
        from kunserve.agent.transport import stage_seq_from_proto

        m = await self._member(context, request.epoch)
        executor = m.executor
        if executor is None or request.stage != m.stage_index:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this agent is not stage {request.stage} of the group of epoch {request.epoch}")
        assert executor is not None
        seqs = [stage_seq_from_proto(s, sampling_from_proto) for s in request.seqs]
        hidden_in = tensor_from_proto(request.hidden)
        last = request.stage == len(m.stages) - 1

        def compute():  # type: ignore[no-untyped-def]
            hidden = executor.run(seqs, hidden_in)
            return executor.sample(seqs, hidden) if last else hidden

        out = await self._guard(context, asyncio.wrap_future(self.loop.call(compute)))
        if last:
            return peer_pb2.StageResult(token_ids=out)
        nxt = peer_pb2.StageBatch(epoch=request.epoch, batch_id=request.batch_id, stage=request.stage + 1,
                                  seqs=request.seqs, hidden=tensor_to_proto(out))
        try:
            return await m._peer(m.stages[request.stage + 1].endpoint).Forward(nxt, timeout=m.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"stage {request.stage + 1} failed: {exc.code().name}: {exc.details()}")
            raise

    async def RemoteAttention(self, request: peer_pb2.RemoteAttentionRequest, context: grpc.aio.ServicerContext
                              ) -> peer_pb2.RemoteAttentionResponse:
        from kunserve.agent.stage import attend_here
        from kunserve.agent.transport import spans_from_proto

        m = await self._member(context, request.epoch)
        e = self.loop.engine
        spans = spans_from_proto(list(request.seqs))
        q, k, v = (tensor_from_proto(t) for t in (request.q, request.k, request.v))
        out = await asyncio.to_thread(attend_here, e.kv_cache, e.dtype, request.layer, spans, q, k, v)
        m.remote_attention_served += 1
        return peer_pb2.RemoteAttentionResponse(out=tensor_to_proto(out.cpu()))

    async def ImportKV(self, request: peer_pb2.ImportKVRequest, context: grpc.aio.ServicerContext
                       ) -> peer_pb2.ImportKVResponse:
        m = await self._member(context, request.epoch)
        try:
            n = await asyncio.to_thread(m.import_kv, request.request_id, request.source, list(request.source_table),
                                        list(request.block_table), request.num_tokens, list(request.layers))
        except grpc.RpcError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"pulling KV from {request.source}: {exc}")
        return peer_pb2.ImportKVResponse(bytes=n)

    async def Join(self, request: peer_pb2.JoinRequest, context: grpc.aio.ServicerContext) -> peer_pb2.JoinResponse:
        m = await self._member(context)
        return await self._guard(context, m.join(request.epoch))

    async def Resume(self, request: peer_pb2.ResumeRequest, context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        from kunserve.agent.service import output_to_proto

        m = await self._member(context)  # the leader's epoch moves once every member joined: wait below
        for _ in range(1000):  # the leader registers handed requests right after every member joined
            queue = m.handoff.get(request.request_id)
            if queue is not None:
                break
            await asyncio.sleep(0.01)
        else:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request {request.request_id} was not handed here")
        assert queue is not None
        done = False
        try:
            while not done:
                item = await queue.get()
                if isinstance(item, EngineStoppedError):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(item))
                if isinstance(item, HandedBack):
                    done = True
                    yield inference_pb2.GenerateResponse(request_id=request.request_id, handed_back=True)
                elif isinstance(item, RequestOutput):
                    done = item.finished
                    if item.new_token_ids or done:
                        yield output_to_proto(item, False)
        finally:
            m.handoff.pop(request.request_id, None)
            if not done:  # the member following it went away
                self.loop.abort(request.request_id)

    async def Reclaim(self, request: peer_pb2.ReclaimRequest, context: grpc.aio.ServicerContext
                      ) -> peer_pb2.ReclaimResponse:
        await self._member(context, request.epoch)
        e = self.loop.engine

        def reclaim() -> int:
            added = e.kv_cache.reclaim_dropped()
            if added:
                e.block_manager.grow(added)  # keeps Status's pool size true (the leader does the accounting)
            return added

        added = await self._guard(context, asyncio.wrap_future(self.loop.call(reclaim)))
        return peer_pb2.ReclaimResponse(new_blocks=added, kv_blocks_total=e.kv_cache.num_blocks)

    async def Collect(self, request: peer_pb2.CollectRequest, context: grpc.aio.ServicerContext
                      ) -> peer_pb2.CollectResponse:
        m = await self._member(context)
        n = await self._guard(context, m.collect(request.epoch, list(request.seqs)))
        return peer_pb2.CollectResponse(bytes=n)

    async def Split(self, request: peer_pb2.SplitRequest, context: grpc.aio.ServicerContext) -> peer_pb2.SplitResponse:
        m = await self._member(context)
        result = await self._guard(context, m.split(request.epoch))
        return peer_pb2.SplitResponse(result=result)

    async def Disband(self, request: peer_pb2.DisbandRequest, context: grpc.aio.ServicerContext
                      ) -> peer_pb2.DisbandResponse:
        m = await self._member(context)
        failed = await self._guard(context, m.disband(request.epoch, request.reason or "disbanded"))
        return peer_pb2.DisbandResponse(failed_requests=failed)


class PeerWeightSource:
    """A WeightSource that pulls weights from a peer agent over gRPC."""

    def __init__(self, target: str, timeout_s: float = 120.0, device: torch.device | str = "cpu") -> None:
        self.target, self.timeout_s, self.device = target, timeout_s, device

    def read_weights(self, names: list[str]) -> dict[str, torch.Tensor]:
        stub = peer_pb2_grpc.PeerStub(channels.sync(self.target))
        try:
            chunks = stub.PullWeights(peer_pb2.PullWeightsRequest(names=names), timeout=self.timeout_s)
            return {k: v.to(self.device) for k, v in assemble_chunks(chunks).items()}
        except grpc.RpcError as exc:
            raise PeerError(f"pulling weights from {self.target}: {exc.code().name}: {exc.details()}") from exc


def pull_kv(target: str, request_id: str, layers: list[int], timeout_s: float = 60.0) -> dict[int, torch.Tensor]:
    """A request's KV per layer from the agent that holds it: [2, tokens, kv_heads, head_dim] each."""
    stub = peer_pb2_grpc.PeerStub(channels.sync(target))
    try:
        chunks = stub.PullKV(peer_pb2.PullKVRequest(request_id=request_id, layers=layers), timeout=timeout_s)
        return {int(name.split(".")[1]): t for name, t in assemble_chunks(chunks).items()}
    except grpc.RpcError as exc:
        raise PeerError(f"pulling KV of {request_id} from {target}: {exc.code().name}: {exc.details()}") from exc
