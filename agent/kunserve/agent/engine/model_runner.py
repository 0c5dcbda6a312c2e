"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, returns logits."""

from __future__ import annotations

import torch

from kunserve.agent.engine.attention import AttentionMetadata, PrefillChunk
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
        hidden = self.model(input_ids, meta, self.kv_cache)  # [N, hidden]
        for seq, n in zip(seqs, counts, strict=True):
            seq.num_computed_tokens += n
        if not samplers:
            return [], torch.empty(0, self.model.config.vocab_size)
        rows = torch.tensor(sample_rows, device=self.device)
        return samplers, self.model.compute_logits(hidden.index_select(0, rows))

    def _prepare(
        self, seqs: list[Sequence], counts: list[int]
    ) -> tuple[torch.Tensor, AttentionMetadata, list[int], list[Sequence]]:
        bs, dev = self.block_size, self.device
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        samplers: list[Sequence] = []
        decodes: list[Sequence] = []
        prefills: list[PrefillChunk] = []
        for seq, n in zip(seqs, counts, strict=True):
            start = seq.num_computed_tokens
            row = len(ids)
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if start + n == seq.num_tokens:
                sample_rows.append(row + n - 1)
                samplers.append(seq)
            if n == 1 and not prefills:
                decodes.append(seq)
            else:
                ctx = start + n
                ctx_slots = self._context_slots([table], torch.tensor([ctx]), ctx)[0]  # [T]
                q_pos = torch.arange(start, ctx, device=dev).unsqueeze(1)  # [Lq, 1]
                mask = torch.arange(ctx, device=dev).unsqueeze(0) <= q_pos  # [Lq, T] causal
                prefills.append(PrefillChunk(row, row + n, ctx_slots, mask))
        d = len(decodes)
        if d:
            ctx_lens = torch.tensor([s.num_computed_tokens + 1 for s in decodes])
            t_max = int(ctx_lens.max())
            decode_slots = self._context_slots([s.block_table for s in decodes], ctx_lens, t_max)
            valid = torch.arange(t_max).unsqueeze(0) < ctx_lens.unsqueeze(1)  # [D, T]
            bias = torch.zeros(d, 1, 1, t_max, dtype=self.model.dtype)
            bias.masked_fill_(~valid.view(d, 1, 1, t_max), float("-inf"))
        else:
            decode_slots = torch.zeros(0, 0, dtype=torch.int64)
            bias = torch.zeros(0, 1, 1, 0, dtype=self.model.dtype)
        meta = AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            num_decodes=d,
            decode_slots=decode_slots.to(dev),
            decode_bias=bias.to(dev),
            prefills=prefills,
        )
        return torch.tensor(ids, dtype=torch.int64, device=dev), meta, sample_rows, samplers

    def _context_slots(self, tables: list[list[int]], ctx_lens: torch.Tensor, t_max: int) -> torch.Tensor:
        """Flat slots [len(tables), t_max] of positions 0..t_max-1 (positions past a table read slot 0)."""
        bs = self.block_size
        width = max(1, -(-t_max // bs))
        padded = torch.zeros(len(tables), width, dtype=torch.int64)
        for i, table in enumerate(tables):
            padded[i, : len(table[:width])] = torch.tensor(table[:width], dtype=torch.int64)
        pos = torch.arange(t_max)
        slots = padded[:, pos // bs] * bs + pos % bs  # [B, T]
        slots.masked_fill_(pos.unsqueeze(0) >= ctx_lens.unsqueeze(1), 0)
        return slots.to(self.device)
