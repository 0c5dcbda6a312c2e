"""The tiny random checkpoints must decode diversely under HF greedy decoding.

A random model that repeats one token would let attention / KV-cache bugs pass the fidelity tests
unnoticed, so the init in kunserve.agent.model.presets is checked here against HF transformers.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from kunserve.agent.model.make_model import build_checkpoint

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The lighthouse keeper opened the ledger",
    "def fibonacci(n: int) -> list[int]:",
    "Once upon a time there was a fox who",
    "The capital of France is",
    "1, 2, 3, 4, 5, 6,",
    "Bread begins with four simple things",
    "<|im_start|>user\nWhat is the weather like?<|im_end|>\n<|im_start|>assistant\n",
    "Q: Why is the ocean salty?\nA:",
]
NEW_TOKENS = 48


@pytest.mark.parametrize("preset", ["tiny", "tiny-untied"])
def test_greedy_continuations_are_diverse(preset: str, tmp_path: Path) -> None:
    d = build_checkpoint(tmp_path / preset, preset).path
    model = transformers.LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    assert model.config.tie_word_embeddings is (preset == "tiny")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == eos
    continuations: list[tuple[int, ...]] = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=eos)
        new = out.sequences[0, ids.shape[1]:].tolist()
        assert len(new) == NEW_TOKENS and eos not in new, f"{prompt!r} stopped early: {new}"
        counts = Counter(new)
        assert len(counts) >= 12, f"{prompt!r}: only {len(counts)} distinct tokens: {new}"
        assert counts.most_common(1)[0][1] <= 0.4 * NEW_TOKENS, f"{prompt!r} repeats: {new}"
        max_logit = max(float(step.abs().max()) for step in out.logits)
        assert max_logit < 30.0, f"{prompt!r}: max |logit| {max_logit:.1f}"
        continuations.append(tuple(new))
    assert len(set(continuations)) == len(PROMPTS)


def test_chat_template_through_hf(tmp_path: Path) -> None:
    d = build_checkpoint(tmp_path / "tiny", "tiny").path
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n"
    assert text == turns + "<|im_start|>assistant\n"
    ids = tok(text).input_ids
    assert ids[0] == 1 and ids.count(2) == 2  # the special tokens are single ids
    assert tok.decode(ids) == text
