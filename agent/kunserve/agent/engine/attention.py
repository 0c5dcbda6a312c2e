"""Attention over the paged KV cache for a step that mixes decodes and prefill chunks.

Token rows of a step are ordered: every decode first (one row each), then each prefill chunk as a
contiguous run of rows. The new k/v are written to the cache before attention, so attention always
reads the whole context (earlier tokens and this step's) from the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kunserve.agent.engine.kv_cache import KVCache

# (layer, q [N, H, D], k [N, KVH, D], v [N, KVH, D]) -> attention output [N, H, D]; stores k/v first.
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(slots=True)
class PrefillChunk:
    start: int  # first row of the chunk in the step's flattened tokens
    end: int  # one past its last row
    context_slots: torch.Tensor  # [T] flat slots of positions 0..T-1 (earlier context + this chunk)
    mask: torch.Tensor  # [Lq, T] bool, True where the query may attend (causal)


@dataclass(slots=True)
class AttentionMetadata:
    positions: torch.Tensor  # [N] int64 position of every row
    slot_mapping: torch.Tensor  # [N] int64 flat slot each row's k/v is written to
    num_decodes: int  # rows [0, D) are decodes
    decode_slots: torch.Tensor  # [D, T_max] int64 context slots per decode (padding points at slot 0)
    decode_bias: torch.Tensor  # [D, 1, 1, T_max] float, 0 where valid and -inf on padding
    prefills: list[PrefillChunk]
    _flat: torch.Tensor | None = field(default=None, repr=False)  # decode_slots_flat, made once

    @property
    def decode_slots_flat(self) -> torch.Tensor:
        """decode_slots as [D*T_max], the same tensor object on every call (the cache splits it once)."""
        flat = self._flat
        if flat is None:
            flat = self._flat = self.decode_slots.reshape(-1)
        return flat


@dataclass(slots=True, frozen=True)
class SeqSpan:
    """The positions one request computes in a step, and its blocks on this agent."""

    block_table: list[int]
    start: int  # first position computed
    num_tokens: int  # positions [start, start + num_tokens)


def build_metadata(
    spans: list[SeqSpan], block_size: int, device: torch.device, dtype: torch.dtype
) -> AttentionMetadata:
    """Metadata for rows laid out span after span (decodes, num_tokens == 1, must come first)."""
    positions: list[int] = []
    slots: list[int] = []
    decodes: list[SeqSpan] = []
    prefills: list[PrefillChunk] = []
    for span in spans:
        start, n, table = span.start, span.num_tokens, span.block_table
        row = len(positions)
        positions.extend(range(start, start + n))
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, start + n))
        if n == 1 and not prefills:
            decodes.append(span)
            continue
        ctx = start + n
        ctx_slots = context_slots([table], torch.tensor([ctx]), ctx, block_size)[0]  # [T]
        q_pos = torch.arange(start, ctx).unsqueeze(1)  # [Lq, 1]
        mask = torch.arange(ctx).unsqueeze(0) <= q_pos  # [Lq, T] causal
        prefills.append(PrefillChunk(row, row + n, ctx_slots.to(device), mask.to(device)))
    d = len(decodes)
    if d:
        ctx_lens = torch.tensor([s.start + 1 for s in decodes])
        t_max = int(ctx_lens.max())
        decode_slots = context_slots([s.block_table for s in decodes], ctx_lens, t_max, block_size)
        valid = torch.arange(t_max).unsqueeze(0) < ctx_lens.unsqueeze(1)  # [D, T]
        bias = torch.zeros(d, 1, 1, t_max, dtype=dtype)
        bias.masked_fill_(~valid.view(d, 1, 1, t_max), float("-inf"))
    else:
        decode_slots = torch.zeros(0, 0, dtype=torch.int64)
        bias = torch.zeros(0, 1, 1, 0, dtype=dtype)
    return AttentionMetadata(
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        num_decodes=d,
        decode_slots=decode_slots.to(device),
        decode_bias=bias.to(device),
        prefills=prefills,
    )


def context_slots(tables: list[list[int]], ctx_lens: torch.Tensor, t_max: int, block_size: int) -> torch.Tensor:
    """Flat slots [len(tables), t_max] of positions 0..t_max-1 (positions past a table read slot 0)."""
    width = max(1, -(-t_max // block_size))
    padded = torch.zeros(len(tables), width, dtype=torch.int64)
    for i, table in enumerate(tables):
        padded[i, : len(table[:width])] = torch.tensor(table[:width], dtype=torch.int64)
    pos = torch.arange(t_max)
    slots = padded[:, pos // block_size] * block_size + pos % block_size  # [B, T]
    slots.masked_fill_(pos.unsqueeze(0) >= ctx_lens.unsqueeze(1), 0)
    return slots


class LocalAttention:
    """Attention over this agent's own pages: append the rows' k/v, then attend over the whole context."""

    def __init__(self, meta: AttentionMetadata, cache: KVCache) -> None:
        self.meta, self.cache = meta, cache

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [N, H, D]; k, v: [N, KVH, D] -> [N, H, D]
        self.cache.write(layer, self.meta.slot_mapping, k, v)
        return paged_attention(q, layer, self.meta, self.cache)


def paged_attention(q: torch.Tensor, layer: int, meta: AttentionMetadata, cache: KVCache) -> torch.Tensor:
    """q: [N, H, D] -> attention output [N, H, D]."""
    _, num_heads, head_dim = q.shape
    kv_heads = cache.num_kv_heads
    group = num_heads // kv_heads
    scale = head_dim**-0.5
    out = torch.empty_like(q)
    d = meta.num_decodes
    if d:
        t_max = meta.decode_slots.shape[1]
        k, v = cache.gather(layer, meta.decode_slots_flat)  # [D*T, KVH, hd]
        k = k.view(d, t_max, kv_heads, head_dim).transpose(1, 2)  # [D, KVH, T, hd] (strided view, no copy)
        v = v.view(d, t_max, kv_heads, head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q[:d].unsqueeze(2), k, v, attn_mask=meta.decode_bias, scale=scale, enable_gqa=group > 1,
        )  # [D, H, 1, hd]
        out[:d] = o.squeeze(2)
    for chunk in meta.prefills:
        k, v = cache.gather(layer, chunk.context_slots)  # [T, KVH, hd]
        qc = q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # [1, H, Lq, hd]
        o = F.scaled_dot_product_attention(
            qc, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
            attn_mask=chunk.mask, scale=scale, enable_gqa=group > 1,
        )  # [1, H, Lq, hd]
        out[chunk.start : chunk.end] = o[0].transpose(0, 1)
    return out
