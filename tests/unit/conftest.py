"""Shared fixtures of the unit tests: a tiny random Llama checkpoint in the HF format.

`tiny_model_dir` prefers the project's own `make-model` code (kunserve.agent.model.make_model's
build_checkpoint, preset "tiny") when it is importable; otherwise it builds an equivalent checkpoint
here with transformers (LlamaForCausalLM.save_pretrained) and a byte-level BPE tokenizer trained with
`tokenizers` on generated text.
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import pytest
import torch

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
BOS_TOKEN = "<|im_start|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = [
    "the",
    "a",
    "an",
    "one",
    "two",
    "three",
    "four",
    "five",
    "model",
    "token",
    "block",
    "cache",
    "memory",
    "layer",
    "pool",
    "grow",
    "shrink",
    "request",
    "serve",
    "batch",
    "prefill",
    "decode",
    "stream",
    "queue",
    "replica",
    "group",
    "drop",
    "restore",
    "weight",
    "byte",
    "engine",
    "agent",
    "gateway",
    "operator",
    "kernel",
    "paged",
    "attention",
    "head",
    "query",
    "key",
    "value",
    "rotary",
    "norm",
    "linear",
    "scale",
    "river",
    "mountain",
    "city",
    "ocean",
    "forest",
    "garden",
    "window",
    "table",
    "chair",
    "light",
    "shadow",
    "morning",
    "evening",
    "winter",
    "summer",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "hello",
    "world",
    "python",
    "rust",
    "cloud",
    "server",
    "naïve",
    "café",
    "résumé",
    "東京",
    "大阪",
    "日本語",
    "über",
    "straße",
    "🚀",
    "✨",
    "α",
    "β",
    "γ",
    "δ",
]


def _corpus_lines(n: int = 400, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 14))]
        sentence = " ".join(words).capitalize()
        lines.append(sentence + rng.choice([".", "!", "?", ",", ";"]) + "\n")
    return lines


def _train_tokenizer(vocab_size: int = 640):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    return tok


def _diverse_init(model: torch.nn.Module, special_ids: tuple[int, ...], seed: int = 0) -> None:
    """Weights large enough that greedy decoding does not collapse into one repeated token.

    HF's default std 0.02 (or unit-gain projections in a 2-layer model with tied embeddings) lets the
    token's own embedding dominate the residual stream, and greedy decoding repeats one token;
    N(0, gain^2/fan_in) projections with output gain 3, N(0, 1) embeddings and a scaled-down final norm
    give varied, moderate logits. Special-token embedding rows are shrunk so the model rarely emits eos.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
                for i in special_ids:
                    p[i] *= 0.05
            elif p.dim() == 2:
                if "q_proj" in name or "k_proj" in name:
                    gain = 3.0  # sharp, position-dependent attention
                elif "o_proj" in name or "down_proj" in name:
                    gain = 3.0  # layer outputs outweigh the token's own embedding in the residual
                else:
                    gain = 2.0
                p.copy_(torch.randn(p.shape, generator=gen) * (gain / math.sqrt(p.shape[1])))
            elif name == "model.norm.weight":
                p.copy_((0.6 + 0.8 * torch.rand(p.shape, generator=gen)) * 0.4)
            else:  # RMSNorm weights
                p.copy_(0.6 + 0.8 * torch.rand(p.shape, generator=gen))


def build_tiny_checkpoint(out: Path) -> Path:
    """Write a tiny random Llama checkpoint (config.json, model.safetensors, tokenizer files) to out."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    bos_id, eos_id = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": False,
                "add_eos_token": False,
                "bos_token": BOS_TOKEN,
                "eos_token": EOS_TOKEN,
                "pad_token": EOS_TOKEN,
                "unk_token": "<|endoftext|>",
                "chat_template": CHAT_TEMPLATE,
                "clean_up_tokenization_spaces": False,
                "model_max_length": 512,
                "tokenizer_class": "GPT2Tokenizer",
            },
            indent=2,
        )
    )
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    _diverse_init(model, tuple(tok.token_to_id(t) for t in SPECIAL_TOKENS))
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def _make_with_project_code(out: Path) -> Path | None:
    """Write the `tiny` preset with the project's make-model code, when that module is importable."""
    try:
        from kunserve.agent.model.make_model import build_checkpoint
    except ImportError:
        return None
    result = build_checkpoint(out, "tiny", seed=0, log=io.StringIO())
    return Path(result.path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint directory (built once per test session)."""
    base = tmp_path_factory.mktemp("tiny-model")
    made = _make_with_project_code(base / "tiny")
    if made is not None:
        return made
    return build_tiny_checkpoint(base / "fallback")
