"""The engine is token-identical to HF transformers LlamaForCausalLM on the same checkpoint, with requests
arriving staggered into a running batch, prompts longer than a block, and chunked prefill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kunserve.agent.engine.config import EngineConfig
from kunserve.agent.engine.llm_engine import LLMEngine
from kunserve.agent.engine.sequence import SamplingParams
from tests.fidelity.reference import assert_matches, hf_greedy, run_staggered

torch.set_num_threads(2)

NEW_TOKENS = 32
PROMPT_LENGTHS = (3, 9, 16, 17, 40, 75, 160, 700)  # block size 16; 700 > the 128-token step budget
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


def _prompts(vocab: int, lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _assert_diverse(token_lists: list[list[int]]) -> None:
    """Guards the comparison: a model stuck on one token would hide attention bugs."""
    for tokens in token_lists:
        assert len(set(tokens)) >= 8, f"greedy output not diverse: {tokens}"
        assert max(tokens.count(t) for t in set(tokens)) <= 0.5 * len(tokens)
    assert len({tuple(t) for t in token_lists}) == len(token_lists), "different prompts gave the same output"


@pytest.mark.parametrize("layout", ["output-major", "input-major"])
@pytest.mark.parametrize("checkpoint", ["tiny_dir", "tiny_untied_dir"])
def test_tiny_matches_transformers(checkpoint: str, layout: str, request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(checkpoint)
    engine = LLMEngine(EngineConfig(model=str(model_dir), progress=False, max_num_batched_tokens=128,
                                    num_kv_blocks=256, weight_layout=layout))
    assert engine.model.input_major is (layout == "input-major")
    prompts = _prompts(engine.model_config.vocab_size, PROMPT_LENGTHS, seed=7)
    traces = run_staggered(engine, prompts, GREEDY)
    reference = hf_greedy(model_dir, prompts, NEW_TOKENS)
    _assert_diverse([ref for ref, _ in reference])
    assert_matches(traces, reference, atol=1e-4)
    assert len(traces[-1].chunk_sizes) > 1 and max(traces[-1].chunk_sizes) <= 128, "700-token prompt not chunked"
    assert max(len(t.chunk_sizes) for t in traces) > NEW_TOKENS, "requests never shared a step"
    engine.block_manager.check_invariant()
    assert engine.block_manager.num_used_blocks == 0


def test_smollm2_matches_transformers(smollm2_dir: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), progress=False, max_num_batched_tokens=32,
                                    num_kv_blocks=64))
    tok = engine.tokenizer
    prompts = [
        tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}]),
        tok.encode("The three primary colors are"),
        tok.encode("def fibonacci(n):\n    "),
        tok.encode("Kubernetes schedules containers onto nodes. A pod is the smallest deployable unit, and a "
                   "deployment keeps a set of identical pods running. When a node fails, the controller "
                   "creates replacement pods elsewhere. Explain in one sentence why this matters:"),
    ]
    assert len(prompts[3]) > 32, "the long prompt must need chunked prefill"
    traces = run_staggered(engine, prompts, GREEDY)
    reference = hf_greedy(smollm2_dir, prompts, NEW_TOKENS)
    _assert_diverse([ref for ref, _ in reference])
    assert_matches(traces, reference, atol=1e-4)
    assert traces[3].chunk_sizes[0] < len(prompts[3]), "the long prompt was not chunked"
    assert "Paris" in tok.decode(traces[0].tokens)
