"""The group's transport over gRPC: how stages reach each other (micro-batches, remote attention, KV
exchange, reclaim), plus the protobuf forms of the group's data.

This module and peer.py are the seam where NCCL or RDMA could carry the same tensors: the leader and the
stages only see the `Transport` calls and futures.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from kunserve.agent import channels
from kunserve.agent.engine.attention import SeqSpan
from kunserve.agent.engine.sequence import SamplingParams
from kunserve.agent.stage import NO_STAGE, StageSeq
from kunserve.rpc.tensors import tensor_from_proto, tensor_to_proto
from kunserve.rpc.v1 import inference_pb2, peer_pb2, peer_pb2_grpc

T = TypeVar("T")


def sampling_to_proto(p: SamplingParams) -> inference_pb2.SamplingParams:
    msg = inference_pb2.SamplingParams(
        max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos, sample_index_offset=p.sample_index_offset,
    )
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def stage_seq_to_proto(s: StageSeq) -> peer_pb2.StageSeq:
    msg = peer_pb2.StageSeq(
        request_id=s.request_id, start=s.start, num_tokens=s.num_tokens, token_ids=s.token_ids,
        tables=[peer_pb2.BlockTable(ids=t) for t in s.tables], kv_stage=s.kv_stage,
        remote_layers=sorted(s.remote_layers), sample=s.sample, output_index=s.output_index,
    )
    if s.sample and s.params is not None:
        msg.sampling.CopyFrom(sampling_to_proto(s.params))
    return msg


def stage_seq_from_proto(msg: peer_pb2.StageSeq, sampling: Callable[[inference_pb2.SamplingParams], SamplingParams]
                         ) -> StageSeq:
    return StageSeq(
        msg.request_id, msg.start, msg.num_tokens, list(msg.token_ids), [list(t.ids) for t in msg.tables],
        msg.kv_stage, frozenset(msg.remote_layers), msg.sample,
        sampling(msg.sampling) if msg.sample else None, msg.output_index,
    )


def spans_to_proto(spans: list[SeqSpan]) -> list[peer_pb2.AttentionSeq]:
    return [peer_pb2.AttentionSeq(block_table=s.block_table, start=s.start, num_tokens=s.num_tokens) for s in spans]


def spans_from_proto(msgs: list[peer_pb2.AttentionSeq]) -> list[SeqSpan]:
    return [SeqSpan(list(m.block_table), m.start, m.num_tokens) for m in msgs]


def _mapped(call: Any, fn: Callable[[Any], T]) -> Future[T]:
    """A concurrent Future of fn(response) for a gRPC future call."""
    fut: Future[T] = Future()

    def done(c: Any) -> None:
        try:
            fut.set_result(fn(c.result()))
        except BaseException as exc:  # gRPC errors and conversion errors alike reach the waiter
            fut.set_exception(exc)

    call.add_done_callback(done)
    return fut


class GrpcTransport:
    """Stubs to every stage of one group (by stage index); every call has a deadline."""

    def __init__(self, epoch: int, endpoints: list[str], timeout_s: float = 30.0) -> None:
        self.epoch, self.endpoints, self.timeout_s = epoch, endpoints, timeout_s
        self._stubs = [peer_pb2_grpc.PeerStub(channels.sync(ep)) for ep in endpoints]
        self.remote_attention_calls = 0

    def close(self) -> None:
        """Nothing to release: the channels are the agent's, shared and kept open (see channels.py)."""

    def forward(self, stage: int, batch_id: int, seqs: list[StageSeq], hidden: torch.Tensor) -> Future[list[int]]:
        req = peer_pb2.StageBatch(epoch=self.epoch, batch_id=batch_id, stage=stage,
                                  seqs=[stage_seq_to_proto(s) for s in seqs], hidden=tensor_to_proto(hidden))
        call = self._stubs[stage].Forward.future(req, timeout=self.timeout_s)
        return _mapped(call, lambda r: list(r.token_ids))

    def remote_attention(self, stage: int, layer: int, spans: list[SeqSpan], q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor) -> Future[torch.Tensor]:
        self.remote_attention_calls += 1
        req = peer_pb2.RemoteAttentionRequest(epoch=self.epoch, layer=layer, seqs=spans_to_proto(spans),
                                              q=tensor_to_proto(q), k=tensor_to_proto(k), v=tensor_to_proto(v))
        call = self._stubs[stage].RemoteAttention.future(req, timeout=self.timeout_s)
        return _mapped(call, lambda r: tensor_from_proto(r.out))

    def import_kv(self, stage: int, request_id: str, source: int, source_table: list[int], table: list[int],
                  num_tokens: int, layers: list[int]) -> Future[int]:
        req = peer_pb2.ImportKVRequest(epoch=self.epoch, request_id=request_id, source=self.endpoints[source],
                                       source_table=source_table, block_table=table, num_tokens=num_tokens,
                                       layers=layers)
        call = self._stubs[stage].ImportKV.future(req, timeout=self.timeout_s)
        return _mapped(call, lambda r: int(r.bytes))

    def reclaim(self, stage: int) -> int:
        resp = self._stubs[stage].Reclaim(peer_pb2.ReclaimRequest(epoch=self.epoch), timeout=self.timeout_s)
        return int(resp.new_blocks)


def pull_kv_blocks(target: str, request_id: str, table: list[int], num_tokens: int, layers: list[int],
                   timeout_s: float = 60.0) -> dict[int, torch.Tensor]:
    """KV of positions [0, num_tokens) stored in `table` on `target`: {layer: [2, tokens, kv_heads, head_dim]}."""
    from kunserve.rpc.tensors import assemble_chunks

    stub = peer_pb2_grpc.PeerStub(channels.sync(target))
    req = peer_pb2.PullKVRequest(request_id=request_id, layers=layers, block_table=table, num_tokens=num_tokens)
    chunks = stub.PullKV(req, timeout=timeout_s)
    return {int(name.split(".")[1]): t for name, t in assemble_chunks(chunks).items()}


__all__ = ["NO_STAGE", "GrpcTransport", "pull_kv_blocks", "sampling_to_proto", "spans_from_proto",
           "stage_seq_from_proto", "stage_seq_to_proto"]
