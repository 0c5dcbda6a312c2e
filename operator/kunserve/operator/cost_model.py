"""Memory and latency cost of grouping replicas into a pipeline (pure integer arithmetic, no torch).

Terms (bytes unless named otherwise):
- a stage holding decoder layers [a, b) of L keeps (b - a) * layer_bytes, plus embed_bytes when a == 0
  and head_bytes (final norm + LM head) when b == L. With tied embeddings the head is the embedding
  matrix: a stage that is both first and last (the full model) keeps it once, but in a pipeline the
  first and the last stage each keep a copy.
- freed(a, b) = full - stage(a, b): what a replica gives up when it goes from the full model to [a, b);
  its KV pool grows by exactly that (DESIGN §3).
- a block is block_size tokens of K and V for every layer held: block_bytes(n) = block_size * n *
  kv_bytes_per_token_layer, with kv_bytes_per_token_layer = 2 * kv_heads * head_dim * dtype_bytes.
- capacity of a pool (tokens) = (pool_bytes // block_bytes(layers held)) * block_size: whole blocks.
- a group's request occupies every stage, so group capacity = min over stages of the stage's capacity
  with its grown pool and its own layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_STAGE_LATENCY_S = 0.0005  # per token per extra pipeline stage: one hop of hidden states + a launch
LayerRange = tuple[int, int]


def even_split(num_layers: int, num_stages: int) -> list[LayerRange]:
    """Contiguous ranges of L // g layers; the first L % g stages get one layer more."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} non-empty stages")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for i in range(num_stages):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


@dataclass(slots=True, frozen=True)
class CostModel:
    """What a model's layers and KV cost, and what one extra pipeline stage costs in latency."""

    num_layers: int
    layer_bytes: int  # weights of one decoder layer
    embed_bytes: int  # the token embedding matrix (first stage)
    head_bytes: int  # final norm + LM head matrix (last stage); the embedding matrix again when tied
    kv_bytes_per_token_layer: int  # 2 * kv_heads * head_dim * dtype_bytes
    block_size: int = 16
    tied_embeddings: bool = False
    stage_latency_s: float = DEFAULT_STAGE_LATENCY_S

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.block_size < 1 or self.kv_bytes_per_token_layer < 1:
            raise ValueError("num_layers, block_size and kv_bytes_per_token_layer must be >= 1")
        if min(self.layer_bytes, self.embed_bytes, self.head_bytes) < 0 or self.stage_latency_s < 0:
            raise ValueError("weight bytes and stage_latency_s must be >= 0")
        if self.tied_embeddings and self.head_bytes < self.embed_bytes:
            raise ValueError("with tied embeddings head_bytes includes the shared embedding matrix")

    @classmethod
    def from_hf_config(
        cls,
        config: Mapping[str, Any],
        dtype_bytes: int,
        *,
        block_size: int = 16,
        stage_latency_s: float = DEFAULT_STAGE_LATENCY_S,
    ) -> CostModel:
        """From the values of a Llama-family config.json (the agent's layer shapes: fused qkv with optional
        bias, gate/up/down without bias, two RMSNorms per layer, a final RMSNorm)."""
        h = int(config["hidden_size"])
        inter = int(config["intermediate_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or h // heads)
        vocab = int(config["vocab_size"])
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        bias = bool(config.get("attention_bias", config.get("model_type") == "qwen2"))
        attn = h * (q_size + 2 * kv_size) + (q_size + 2 * kv_size if bias else 0) + q_size * h
        layer_params = attn + 3 * h * inter + 2 * h
        return cls(
            num_layers=int(config["num_hidden_layers"]),
            layer_bytes=layer_params * dtype_bytes,
            embed_bytes=vocab * h * dtype_bytes,
            head_bytes=(vocab * h + h) * dtype_bytes,
            kv_bytes_per_token_layer=2 * kv_size * dtype_bytes,
            block_size=block_size,
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            stage_latency_s=stage_latency_s,
        )

    # ---- weights ---------------------------------------------------------------------------------------------
    def _check_range(self, start: int, end: int) -> None:
        if not 0 <= start < end <= self.num_layers:
            raise ValueError(f"layer range [{start}, {end}) outside [0, {self.num_layers})")

    def stage_weight_bytes(self, start: int, end: int) -> int:
        """Weight bytes a stage holding layers [start, end) keeps resident."""
        self._check_range(start, end)
        total = (end - start) * self.layer_bytes
        first, last = start == 0, end == self.num_layers
        if first:
            total += self.embed_bytes
        if last:
            total += self.head_bytes
        if first and last and self.tied_embeddings:
            total -= self.embed_bytes  # one matrix serves as embedding and head
        return total

    @property
    def full_weight_bytes(self) -> int:
        return self.stage_weight_bytes(0, self.num_layers)

    def freed_bytes(self, start: int, end: int) -> int:
        """Bytes a replica frees going from the full model to the stage [start, end)."""
        return self.full_weight_bytes - self.stage_weight_bytes(start, end)

    # ---- KV --------------------------------------------------------------------------------------------------
    def kv_bytes_per_token(self, num_layers: int | None = None) -> int:
        """K+V bytes one token costs on a replica holding num_layers layers (default: all)."""
        return (self.num_layers if num_layers is None else num_layers) * self.kv_bytes_per_token_layer

    def block_bytes(self, num_layers: int | None = None) -> int:
        return self.block_size * self.kv_bytes_per_token(num_layers)

    def block_capacity(self, pool_bytes: int, num_layers: int | None = None) -> int:
        """Whole KV blocks a pool of pool_bytes holds for num_layers layers (default: all)."""
        return max(pool_bytes, 0) // self.block_bytes(num_layers)

    def token_capacity(self, pool_bytes: int, num_layers: int | None = None) -> int:
        """Tokens (in whole blocks) a pool of pool_bytes holds for num_layers layers (default: all)."""
        return self.block_capacity(pool_bytes, num_layers) * self.block_size

    def group_capacity(self, pool_bytes: Sequence[int], split: Sequence[LayerRange]) -> int:
        """Tokens a group holds after the drop: stage i (current pool pool_bytes[i], full model now) takes
        split[i]; min over stages of (pool + freed) // block bytes of the stage's layers, in tokens."""
        self.check_split(split)
        if len(pool_bytes) != len(split):
            raise ValueError(f"{len(pool_bytes)} pools for {len(split)} stages")
        return min(
            self.token_capacity(pool + self.freed_bytes(a, b), b - a)
            for pool, (a, b) in zip(pool_bytes, split, strict=True)
        )

    def group_gain(self, pool_bytes: Sequence[int], split: Sequence[LayerRange]) -> int:
        """Group capacity after the drop minus the members' capacities alone (tokens; may be negative)."""
        return self.group_capacity(pool_bytes, split) - sum(self.token_capacity(p) for p in pool_bytes)

    def added_latency_s(self, group_size: int) -> float:
        """Per-token latency a pipeline of group_size stages adds over a lone replica."""
        return max(group_size - 1, 0) * self.stage_latency_s

    # ---- splits ----------------------------------------------------------------------------------------------
    def check_split(self, split: Sequence[LayerRange]) -> None:
        """Raise unless split covers [0, L) with non-empty contiguous ranges, in order."""
        expected = 0
        for a, b in split:
            if a != expected or b <= a:
                raise ValueError(f"split {list(split)} is not contiguous non-empty ranges from 0")
            expected = b
        if expected != self.num_layers:
            raise ValueError(f"split {list(split)} does not end at {self.num_layers}")

    def even_split(self, num_stages: int) -> list[LayerRange]:
        return even_split(self.num_layers, num_stages)

    def balanced_split(self, pool_bytes: Sequence[int]) -> list[LayerRange]:
        """The split (stages in the given order, each >= 1 layer) maximising the group capacity.

        Stage i with n layers keeps A_i - n * layer_bytes for KV, where A_i = pool_i + full - extra_i (embed
        on the first stage, head on the last); it holds C blocks iff n <= A_i // (layer_bytes + C * block
        bytes per layer). Binary search the largest C the stages can reach with sum(n) >= L, then trim the
        surplus from the largest stages (ties: the later stage), so equal pools without extras give the even
        split.
        """
        g, num_layers = len(pool_bytes), self.num_layers
        if not 1 <= g <= num_layers:
            raise ValueError(f"cannot split {num_layers} layers into {g} non-empty stages")
        if g == 1:
            return [(0, num_layers)]
        full = self.full_weight_bytes
        avail = [p + full for p in pool_bytes]
        avail[0] -= self.embed_bytes
        avail[-1] -= self.head_bytes
        per_block_layer = self.block_bytes(1)
        cap = num_layers - (g - 1)

        def max_layers(blocks: int) -> list[int]:
            unit = self.layer_bytes + blocks * per_block_layer
            return [cap if unit == 0 else min(cap, a // unit) for a in avail]

        def feasible(blocks: int) -> bool:
            n = max_layers(blocks)
            return min(n) >= 1 and sum(n) >= num_layers

        lo, hi = 0, max(avail) // per_block_layer + 1  # lo feasible (A_i >= L * layer_bytes), hi not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
        counts = max_layers(lo)
        for _ in range(sum(counts) - num_layers):
            i = max(range(g), key=lambda j: (counts[j], j))
            counts[i] -= 1
        ranges, start = [], 0
        for n in counts:
            ranges.append((start, start + n))
            start += n
        return ranges
