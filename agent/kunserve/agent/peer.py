"""Peer service (weights and KV as chunked tensor streams between agents) and its client side.

The transport seam: PeerWeightSource and pull_kv are the only places that move tensors between agents;
an NCCL or RDMA transport would implement the same two calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import grpc
import torch

from kunserve.agent.engine.migration import read_kv
from kunserve.agent.engine_loop import EngineLoop, EngineStoppedError
from kunserve.agent.errors import InvalidRequestError, KunServeError
from kunserve.rpc.tensors import assemble_chunks, grpc_channel_options, iter_chunks
from kunserve.rpc.v1 import peer_pb2, peer_pb2_grpc, tensor_pb2

DEFAULT_CHUNK_BYTES = 1 << 20


class PeerError(KunServeError):
    """A peer could not supply what was asked (unreachable, or it does not hold it)."""


def _chunks(tensors: dict[str, torch.Tensor], chunk_bytes: int) -> Iterable[tensor_pb2.TensorChunk]:
    for name, tensor in tensors.items():
        yield from iter_chunks(name, tensor, chunk_bytes or DEFAULT_CHUNK_BYTES)


class PeerServicer(peer_pb2_grpc.PeerServicer):
    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop

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
        kv = await self._on_engine(lambda: read_kv(self.loop.engine, request.request_id, layers), context)
        for chunk in _chunks({f"kv.{layer}": t for layer, t in kv.items()}, request.chunk_bytes):
            yield chunk


class PeerWeightSource:
    """A WeightSource that pulls weights from a peer agent over gRPC."""

    def __init__(self, target: str, timeout_s: float = 120.0, device: torch.device | str = "cpu") -> None:
        self.target, self.timeout_s, self.device = target, timeout_s, device

    def read_weights(self, names: list[str]) -> dict[str, torch.Tensor]:
        with grpc.insecure_channel(self.target, options=grpc_channel_options()) as channel:
            stub = peer_pb2_grpc.PeerStub(channel)
            try:
                chunks = stub.PullWeights(peer_pb2.PullWeightsRequest(names=names), timeout=self.timeout_s)
                return {k: v.to(self.device) for k, v in assemble_chunks(chunks).items()}
            except grpc.RpcError as exc:
                raise PeerError(f"pulling weights from {self.target}: {exc.code().name}: {exc.details()}") from exc


def pull_kv(target: str, request_id: str, layers: list[int], timeout_s: float = 60.0) -> dict[int, torch.Tensor]:
    """A request's KV per layer from the agent that holds it: [2, tokens, kv_heads, head_dim] each."""
    with grpc.insecure_channel(target, options=grpc_channel_options()) as channel:
        stub = peer_pb2_grpc.PeerStub(channel)
        try:
            chunks = stub.PullKV(peer_pb2.PullKVRequest(request_id=request_id, layers=layers), timeout=timeout_s)
            return {int(name.split(".")[1]): t for name, t in assemble_chunks(chunks).items()}
        except grpc.RpcError as exc:
            raise PeerError(f"pulling KV of {request_id} from {target}: {exc.code().name}: {exc.details()}") from exc
