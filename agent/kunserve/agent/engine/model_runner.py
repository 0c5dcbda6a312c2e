"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, returns logits."""

from __future__ import annotations

import torch

from kunserve.agent.engine.attention import AttentionMetadata, LocalAttention, SeqSpan, build_metadata
from kunserve.agent.engine.kv_cache import KVCache
from kunserve.agent.engine.scheduler import ScheduledBatch
from kunserve.agent.engine.sequence import Sequence
from kunserve.agent.model.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = model.device

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """Compute the batch's tokens; returns the sequences that sample and their logits [S, V] fp32.

        A sequence samples when this step computes its last known token (a decode, or the final chunk
        of its prompt). Advances num_computed_tokens of every scheduled sequence.
        """
        order = sorted(range(len(batch.seqs)), key=lambda i: batch.num_new_tokens[i] != 1)  # decodes first
        seqs = [batch.seqs[i] for i in order]
        counts = [batch.num_new_tokens[i] for i in order]
        input_ids, meta, sample_rows, samplers = self._prepare(seqs, counts)
        hidden = self.model(input_ids, meta.positions, LocalAttention(meta, self.kv_cache))  # [N, hidden]
        for seq, n in zip(seqs, counts, strict=True):
            seq.num_computed_tokens += n
        if not samplers:
            return [], torch.empty(0, self.model.config.vocab_size)
        rows = torch.tensor(sample_rows, device=self.device)
        return samplers, self.model.compute_logits(hidden.index_select(0, rows))

    def _prepare(
        self, seqs: list[Sequence], counts: list[int]
    ) -> tuple[torch.Tensor, AttentionMetadata, list[int], list[Sequence]]:
        ids: list[int] = []
        spans: list[SeqSpan] = []
        sample_rows: list[int] = []
        samplers: list[Sequence] = []
        for seq, n in zip(seqs, counts, strict=True):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start : start + n])
            spans.append(SeqSpan(seq.block_table, start, n))
            if start + n == seq.num_tokens:
                sample_rows.append(len(ids) - 1)
                samplers.append(seq)
        meta = build_metadata(spans, self.block_size, self.device, self.model.dtype)
        return torch.tensor(ids, dtype=torch.int64, device=self.device), meta, sample_rows, samplers
