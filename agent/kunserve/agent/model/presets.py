"""Presets for `kunserve make-model`: the tiny random Llama checkpoints and their real BPE tokenizer.

Everything here is deterministic: the tokenizer is trained on the shipped corpus (the `tokenizers`
BPE trainer gives the same bytes on every run) and the weights come from one seeded generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

DATA_DIR = Path(__file__).resolve().parent / "data"
CORPUS_PATH = DATA_DIR / "corpus.txt"

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|im_end|>"
UNK_TOKEN = "<|endoftext|>"
TINY_VOCAB_SIZE = 2048

# The SmolLM2 ChatML shape, without SmolLM2's default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(slots=True, frozen=True)
class InitScheme:
    """How the random weights are drawn (chosen so greedy decoding stays diverse)."""

    embed_std: float = 0.3  # token embeddings, and the untied output head
    qk_gain: float = 1.5  # q/k projections: N(0, (gain / sqrt(fan_in))^2); moderately sharp attention
    proj_gain: float = 1.0  # v/o/gate/up/down: N(0, (gain / sqrt(fan_in))^2)
    norm_low: float = 0.6  # RMSNorm weights ~ U(norm_low, norm_high)
    norm_high: float = 1.4
    special_scale: float = 0.05  # special-token rows of the embedding / head are shrunk


@dataclass(slots=True, frozen=True)
class TinySpec:
    """Shape of one tiny Llama preset."""

    name: str
    tie_word_embeddings: bool
    num_key_value_heads: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 6
    head_dim: int = 32
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    init: InitScheme = field(default_factory=InitScheme)


TINY_PRESETS: dict[str, TinySpec] = {
    "tiny": TinySpec(name="tiny", tie_word_embeddings=True, num_key_value_heads=2, rope_theta=10000.0),
    "tiny-untied": TinySpec(
        name="tiny-untied",
        tie_word_embeddings=False,
        num_key_value_heads=3,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    ),
}


def train_tiny_tokenizer(corpus: Path = CORPUS_PATH, vocab_size: int = TINY_VOCAB_SIZE) -> Tokenizer:
    """Train the byte-level BPE tokenizer of the tiny presets on `corpus` (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def tokenizer_config(chat_template: str, model_max_length: int) -> dict[str, Any]:
    """The tokenizer_config.json shared by every preset (SmolLM2's special-token roles)."""
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        "additional_special_tokens": [BOS_TOKEN, EOS_TOKEN],
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "tokenizer_class": "GPT2Tokenizer",
    }


def llama_config(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    head_dim: int,
    rms_norm_eps: float,
    rope_theta: float,
    rope_scaling: dict[str, Any] | None,
    max_position_embeddings: int,
    tie_word_embeddings: bool,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
) -> dict[str, Any]:
    """A config.json for LlamaForCausalLM in the HF layout (fp32)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": rms_norm_eps,
        "rope_scaling": rope_scaling,
        "rope_theta": rope_theta,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "float32",
        "dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def tiny_config(spec: TinySpec, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> dict[str, Any]:
    """config.json for a tiny preset."""
    return llama_config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        rms_norm_eps=spec.rms_norm_eps,
        rope_theta=spec.rope_theta,
        rope_scaling=spec.rope_scaling,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def generation_config(bos_id: int, eos_id: int, pad_id: int) -> dict[str, Any]:
    """generation_config.json: greedy by default, stop at eos."""
    return {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "do_sample": False}


def init_tiny_weights(
    spec: TinySpec, vocab_size: int, seed: int, special_ids: tuple[int, ...] = ()
) -> dict[str, torch.Tensor]:
    """Seeded fp32 weights with HF tensor names, in HF state_dict order.

    The usual std-0.02 init lets the token embedding dominate the residual stream and greedy decoding
    repeats one token. Here every projection is N(0, gain^2 / fan_in), so each layer moves the
    residual stream by O(1), with a larger gain on q/k so attention depends on content and position;
    embeddings are N(0, 0.3^2) (max |logit| ~ 20-25); norm weights are U(0.6, 1.4), and the final
    norm's get random signs, which breaks the tied head's preference for the token just read;
    special-token rows are shrunk so a random model does not emit eos.
    """
    init = spec.init
    gen = torch.Generator().manual_seed(seed)
    h, inter, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q_out, kv_out = spec.num_attention_heads * hd, spec.num_key_value_heads * hd

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    def linear(out_f: int, in_f: int, gain: float) -> torch.Tensor:
        return normal((out_f, in_f), gain / math.sqrt(in_f))

    def norm(n: int) -> torch.Tensor:
        u = torch.rand((n,), generator=gen, dtype=torch.float32)
        return init.norm_low + (init.norm_high - init.norm_low) * u

    def shrink_special(w: torch.Tensor) -> torch.Tensor:
        for i in special_ids:
            w[i] *= init.special_scale
        return w

    out: dict[str, torch.Tensor] = {}
    out["model.embed_tokens.weight"] = shrink_special(normal((vocab_size, h), init.embed_std))
    for n in range(spec.num_hidden_layers):
        p = f"model.layers.{n}."
        out[p + "self_attn.q_proj.weight"] = linear(q_out, h, init.qk_gain)
        out[p + "self_attn.k_proj.weight"] = linear(kv_out, h, init.qk_gain)
        out[p + "self_attn.v_proj.weight"] = linear(kv_out, h, init.proj_gain)
        out[p + "self_attn.o_proj.weight"] = linear(h, q_out, init.proj_gain)
        out[p + "mlp.gate_proj.weight"] = linear(inter, h, init.proj_gain)
        out[p + "mlp.up_proj.weight"] = linear(inter, h, init.proj_gain)
        out[p + "mlp.down_proj.weight"] = linear(h, inter, init.proj_gain)
        out[p + "input_layernorm.weight"] = norm(h)
        out[p + "post_attention_layernorm.weight"] = norm(h)
    signs = torch.randint(0, 2, (h,), generator=gen, dtype=torch.int64).to(torch.float32) * 2.0 - 1.0
    out["model.norm.weight"] = norm(h) * signs
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = shrink_special(normal((vocab_size, h), init.embed_std))
    return out
