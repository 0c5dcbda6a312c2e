"""Attention over the paged KV cache for a step that mixes decodes and prefill chunks.

Token rows of a step are ordered: every decode first (one row each), then each prefill chunk as a
contiguous run of rows. The new k/v are written to the cache before attention, so attention always
reads the whole context (earlier tokens and this step's) from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kunserve.agent.engine.kv_cache import KVCache


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
        k, v = cache.gather(layer, meta.decode_slots.view(-1))  # [D*T, KVH, hd]
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
