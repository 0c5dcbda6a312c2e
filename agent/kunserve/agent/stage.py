"""One pipeline stage's share of a micro-batch: its layers over the rows, with each layer's attention run
where that request's KV for the layer lives (here, or on the agent that still holds it: remote attention).

Used by every member of a cooperative group: stage 0 (the leader) embeds token ids, later stages take the
previous stage's hidden states, and the last stage samples. Block tables come with the batch (the leader
does every stage's accounting); a stage keeps no per-request state. No gRPC here: remote attention goes
through the `RemoteAttend` callable the caller supplies (the transport seam).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from kunserve.agent.engine.attention import AttentionMetadata, LocalAttention, SeqSpan, build_metadata
from kunserve.agent.engine.kv_cache import KVCache
from kunserve.agent.engine.sampler import Sampler
from kunserve.agent.engine.sequence import SamplingParams
from kunserve.agent.model.llama import LlamaModel

NO_STAGE = -1


@dataclass(slots=True)
class StageSeq:
    """One request in a micro-batch (the wire form is peer.proto's StageSeq)."""

    request_id: str
    start: int  # first position computed
    num_tokens: int  # positions [start, start + num_tokens)
    token_ids: list[int]  # those positions' tokens (stage 0 reads them)
    tables: list[list[int]]  # the request's blocks on every stage, in stage order
    kv_stage: int = NO_STAGE  # stage still holding some of its layers' KV (a request from before the drop)
    remote_layers: frozenset[int] = frozenset()  # those layers: attention runs on kv_stage
    sample: bool = False  # the last stage samples a token for it
    params: SamplingParams | None = None
    output_index: int = 0  # seeds the request's generator for this token


# (stage holding the KV, layer, spans there, q, k, v) -> future of the attention output [rows, H, D]
RemoteAttend = Callable[[int, int, list[SeqSpan], torch.Tensor, torch.Tensor, torch.Tensor], "Future[torch.Tensor]"]


class GroupAttention:
    """The attention callable for one micro-batch on one stage: local pages where the KV is here, remote
    attention (overlapped with the local part) where it is still on another member."""

    def __init__(self, stage: int, seqs: list[StageSeq], cache: KVCache, dtype: torch.dtype,
                 remote: RemoteAttend) -> None:
        self.stage, self.seqs, self.cache, self.dtype, self.remote = stage, seqs, cache, dtype, remote
        self.rows: list[range] = []
        row = 0
        for s in seqs:
            self.rows.append(range(row, row + s.num_tokens))
            row += s.num_tokens
        self._meta: dict[tuple[int, ...], AttentionMetadata] = {}
        self.remote_calls = 0

    def _is_remote(self, s: StageSeq, layer: int) -> bool:
        return s.kv_stage not in (NO_STAGE, self.stage) and layer in s.remote_layers

    def _local_meta(self, idx: tuple[int, ...]) -> AttentionMetadata:
        meta = self._meta.get(idx)
        if meta is None:
            spans = [SeqSpan(self.seqs[i].tables[self.stage], self.seqs[i].start, self.seqs[i].num_tokens) for i in idx]
            meta = self._meta[idx] = build_metadata(spans, self.cache.block_size, self.cache.device, self.dtype)
        return meta

    def _index(self, idx: list[int]) -> torch.Tensor:
        return torch.tensor([r for i in idx for r in self.rows[i]], dtype=torch.int64, device=self.cache.device)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [N, H, D]; k, v: [N, KVH, D] -> [N, H, D]
        remote = [i for i, s in enumerate(self.seqs) if self._is_remote(s, layer)]
        local = tuple(i for i, s in enumerate(self.seqs) if not self._is_remote(s, layer))
        if not remote:
            return LocalAttention(self._local_meta(local), self.cache)(layer, q, k, v)
        pending: list[tuple[torch.Tensor, Future[torch.Tensor]]] = []
        by_stage: dict[int, list[int]] = {}
        for i in remote:
            by_stage.setdefault(self.seqs[i].kv_stage, []).append(i)
        for kv_stage, idx in by_stage.items():
            rows = self._index(idx)
            spans = [SeqSpan(self.seqs[i].tables[kv_stage], self.seqs[i].start, self.seqs[i].num_tokens) for i in idx]
            fut = self.remote(kv_stage, layer, spans, q.index_select(0, rows), k.index_select(0, rows),
                              v.index_select(0, rows))
            pending.append((rows, fut))
            self.remote_calls += 1
        out = torch.empty_like(q)
        if local:
            rows = self._index(list(local))
            attend = LocalAttention(self._local_meta(local), self.cache)
            out[rows] = attend(layer, q.index_select(0, rows), k.index_select(0, rows), v.index_select(0, rows))
        for rows, fut in pending:
            out[rows] = fut.result().to(device=out.device, dtype=out.dtype)
        return out


class StageExecutor:
    """Runs this agent's layers for micro-batches of its group."""

    def __init__(self, stage: int, model: LlamaModel, cache: KVCache, sampler: Sampler, remote: RemoteAttend) -> None:
        self.stage, self.model, self.cache, self.sampler, self.remote = stage, model, cache, sampler, remote
        self.remote_calls = 0

    @torch.inference_mode()
    def run(self, seqs: list[StageSeq], hidden: torch.Tensor | None) -> torch.Tensor:
        """hidden [rows, hidden_size] from the previous stage (None on stage 0) -> hidden after this stage."""
        dev = self.model.device
        positions = torch.tensor([p for s in seqs for p in range(s.start, s.start + s.num_tokens)],
                                 dtype=torch.int64, device=dev)
        if hidden is None:
            inputs = torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.int64, device=dev)
        else:
            inputs = hidden.to(device=dev)
        attention = GroupAttention(self.stage, seqs, self.cache, self.model.dtype, self.remote)
        out = self.model(inputs, positions, attention)
        self.remote_calls += attention.remote_calls
        return out

    @torch.inference_mode()
    def sample(self, seqs: list[StageSeq], hidden: torch.Tensor) -> list[int]:
        """On the last stage: one token per request with `sample` set, in batch order."""
        rows, params, indices = [], [], []
        row = 0
        for s in seqs:
            row += s.num_tokens
            if s.sample:
                assert s.params is not None, "a sampled request carries its sampling parameters"
                rows.append(row - 1)
                params.append(s.params)
                indices.append(s.output_index)
        if not rows:
            return []
        picked = hidden.index_select(0, torch.tensor(rows, device=hidden.device))
        return self.sampler(self.model.compute_logits(picked), params, indices)


def attend_here(cache: KVCache, dtype: torch.dtype, layer: int, spans: list[SeqSpan], q: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The serving side of remote attention: append k/v to these requests' pages of `layer` and attend."""
    with torch.inference_mode():
        meta = build_metadata(spans, cache.block_size, cache.device, dtype)
        dev = cache.device
        return LocalAttention(meta, cache)(layer, q.to(dev, dtype), k.to(dev, dtype), v.to(dev, dtype))
