"""Llama-family decoder that can be built for a layer range [start, end).

The embedding lives only where the range starts at 0; the final norm and the LM head only where it ends
at L. Layers are kept in a ModuleDict keyed by their global index, so a layer store can drop and restore
single layers. Projections are fused (q/k/v and gate/up) so a decode step runs fewer, larger matmuls.
Attention reads and writes a paged KV cache (see engine/kv_cache.py) through AttentionMetadata.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kunserve.agent.engine.attention import AttentionFn
from kunserve.agent.model.config import ModelConfig, RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel, bit-identical to the steps below in fp32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Computed in fp32 like the reference implementation, then cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32, with Llama-3 scaling when configured."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.rope_type != "llama3":
        return inv_freq
    old_ctx = scaling.original_max_position_embeddings
    low_wavelen = old_ctx / scaling.low_freq_factor
    high_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables [max_positions, head_dim] computed once; rows are picked by position."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        pos = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", emb.cos().to(dtype=dtype, device=device), persistent=False)
        self.register_buffer("sin", emb.sin().to(dtype=dtype, device=device), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] -> cos, sin [N, 1, D], looked up once per step and shared by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [N, heads, D]; cos/sin: [N, 1, D]
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _input_major(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """A [rows, cols] weight stored column-major ([cols, rows] in memory).

    For wide projections (q/k/v, gate/up, the LM head) the CPU BLAS runs x @ W^T with W^T contiguous much
    faster for one row (SmolLM2-135M decode: 30 vs 48 ms of matrix products per step); at 16 rows the two
    layouts are within run-to-run noise (bench/profile_step.py), so the engine picks it only for
    latency-bound configurations. The parameter keeps its logical [out, in] shape, so loading and state
    dicts are unchanged.
    """
    return nn.Parameter(torch.empty(cols, rows, dtype=dtype, device=device).t(), requires_grad=False)


def empty_embedding(vocab: int, hidden: int, dtype: torch.dtype, device: torch.device) -> nn.Embedding:
    """An embedding with uninitialised storage (its weights are loaded right after)."""
    return nn.Embedding(vocab, hidden, dtype=dtype, device="meta").to_empty(device=device)


def _linear(
    in_f: int, out_f: int, bias: bool, dtype: torch.dtype, device: torch.device, input_major: bool = False
) -> nn.Linear:
    # Built on the meta device and given uninitialised storage: the loader overwrites every weight, and a
    # random init of a whole model's projections costs seconds on a CPU (it showed in restore times).
    layer = nn.Linear(in_f, out_f, bias=bias, dtype=dtype, device="meta").to_empty(device=device)
    if input_major:
        layer.weight = _input_major(out_f, in_f, dtype, device)
    layer.requires_grad_(False)
    return layer


class DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_id: int, dtype: torch.dtype, device: torch.device, input_major: bool = False
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        h, inter = config.hidden_size, config.intermediate_size
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps, dtype, device)
        self.qkv_proj = _linear(h, self.q_size + 2 * self.kv_size, config.attention_bias, dtype, device, input_major)
        self.o_proj = _linear(self.q_size, h, False, dtype, device)
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps, dtype, device)
        self.gate_up_proj = _linear(h, 2 * inter, False, dtype, device, input_major)
        self.down_proj = _linear(inter, h, False, dtype, device)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attention: AttentionFn) -> torch.Tensor:
        # x: [N, hidden] — every scheduled token of the step, flattened.
        n = x.shape[0]
        cos, sin = rope
        qkv = self.qkv_proj(self.input_layernorm(x))
        qk, v = qkv.split((self.q_size + self.kv_size, self.kv_size), dim=-1)
        qk = apply_rope(qk.view(n, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin)  # q and k at once
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        attn = attention(self.layer_id, q, k, v)  # [N, H, D]; k/v stored where this layer's KV lives
        x = x + self.o_proj(attn.reshape(n, self.q_size))
        gate, up = self.gate_up_proj(self.post_attention_layernorm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class LlamaModel(nn.Module):
    """The layers [start, end) of a Llama-family decoder. input_major: see _input_major."""

    def __init__(
        self,
        config: ModelConfig,
        start: int,
        end: int,
        dtype: torch.dtype,
        device: torch.device,
        input_major: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(f"layer range [{start}, {end}) outside [0, {config.num_hidden_layers})")
        self.config, self.start, self.end = config, start, end
        self.dtype, self.device, self.input_major = dtype, device, input_major
        self.is_first, self.is_last = start == 0, end == config.num_hidden_layers
        h, vocab = config.hidden_size, config.vocab_size
        self.embed_tokens: nn.Embedding | None = None
        if self.is_first:
            self.embed_tokens = empty_embedding(vocab, h, dtype, device)
            if config.tie_word_embeddings and input_major:  # it doubles as the LM head
                self.embed_tokens.weight = _input_major(vocab, h, dtype, device)
            self.embed_tokens.requires_grad_(False)
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(config, i, dtype, device, input_major) for i in range(start, end)}
        )
        self.norm: RMSNorm | None = RMSNorm(h, config.rms_norm_eps, dtype, device) if self.is_last else None
        self.lm_head: nn.Linear | None = None
        if self.is_last:
            self.lm_head = _linear(h, vocab, False, dtype, device, input_major)
            if config.tie_word_embeddings and self.embed_tokens is not None:
                self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(config, dtype, device)

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        """inputs: token ids [N] on the first stage, else hidden states [N, hidden]; positions [N]
        -> hidden [N, hidden]. `attention` stores each layer's k/v and attends (locally or remotely)."""
        x = self.embed_tokens(inputs) if self.embed_tokens is not None else inputs.to(self.dtype)
        rope = self.rope(positions)
        for layer in self.layers.values():
            x = layer(x, rope, attention)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [S, hidden] (rows that sample) -> fp32 logits [S, vocab]."""
        assert self.norm is not None and self.lm_head is not None, "logits need the last stage"
        return self.lm_head(self.norm(hidden)).float()

    def held_layers(self) -> list[int]:
        return [int(k) for k in self.layers]

    def set_layers(self, layers: dict[int, DecoderLayer]) -> None:
        """Replace the held layers (a contiguous range) keeping them in layer order; updates start/end.
        The embedding, final norm and LM head are managed by the caller (see layer_store)."""
        ids = sorted(layers)
        assert ids and ids == list(range(ids[0], ids[-1] + 1)), f"layers must be a contiguous range, got {ids}"
        self.layers = nn.ModuleDict({str(i): layers[i] for i in ids})
        self.start, self.end = ids[0], ids[-1] + 1
        self.is_first, self.is_last = self.start == 0, self.end == self.config.num_hidden_layers
