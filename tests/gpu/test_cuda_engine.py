"""The engine on CUDA: token-identical to HF transformers on the same GPU, fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kunserve.agent.engine.config import EngineConfig
from kunserve.agent.engine.llm_engine import LLMEngine
from kunserve.agent.engine.sequence import SamplingParams
from tests.fidelity.reference import assert_matches, hf_greedy, run_staggered

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


@pytest.fixture(autouse=True)
def _no_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.mark.parametrize("checkpoint", ["tiny_dir", "tiny_untied_dir", "smollm2_dir"])
def test_cuda_matches_transformers(checkpoint: str, request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(checkpoint)
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cuda", progress=False,
                                    max_num_batched_tokens=128, num_kv_blocks=256))
    assert engine.device.type == "cuda"
    g = torch.Generator().manual_seed(11)
    vocab = engine.model_config.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 16, 33, 300)]
    traces = run_staggered(engine, prompts, GREEDY)
    worst = assert_matches(traces, hf_greedy(model_dir, prompts, 32, device="cuda"), atol=1e-3)
    print(f"{checkpoint}: worst logit difference {worst:.3g}")
    engine.block_manager.check_invariant()


def test_cuda_budget_sizes_pool_from_free_memory(tiny_dir: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_dir), device="cuda", progress=False, gpu_memory_utilization=0.05))
    free, _ = torch.cuda.mem_get_info()
    kv_bytes = engine.block_manager.num_blocks * engine.kv_cache.block_bytes
    assert kv_bytes > 0
    # The pool was sized from 5 % of the free memory measured after the weights were loaded.
    assert kv_bytes <= 0.05 * (free + kv_bytes) + engine.kv_cache.block_bytes
