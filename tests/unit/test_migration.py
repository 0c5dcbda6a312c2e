"""A running request moves to another engine with its KV and continues with no token changed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kunserve.agent.engine.config import EngineConfig
from kunserve.agent.engine.llm_engine import LLMEngine
from kunserve.agent.engine.migration import adopt_request, export_request, read_kv
from kunserve.agent.engine.sequence import SamplingParams
from kunserve.agent.errors import InvalidRequestError, PoolError

PROMPTS = [list(range(20, 45)), list(range(300, 310)), [9] * 40]
PARAMS = [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
          SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True),
          SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)]


def _engine(model_dir: Path, blocks: int = 64) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), progress=False, num_kv_blocks=blocks))


def _run(engine: LLMEngine, out: dict[str, list[int]]) -> None:
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)


@pytest.mark.parametrize("checkpoint", ["tiny_dir", "tiny_untied_dir"])
def test_moved_requests_continue_unchanged(checkpoint: str, request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(checkpoint)
    reference = _engine(model_dir).generate(PROMPTS, PARAMS)
    source, target = _engine(model_dir), _engine(model_dir)
    out: dict[str, list[int]] = {}
    for i, (p, sp) in enumerate(zip(PROMPTS, PARAMS, strict=True)):
        source.add_request(p, sp, request_id=f"r{i}")
    for _ in range(7):
        for o in source.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    for rid in ("r0", "r1"):  # a greedy and a seeded request move; r2 stays
        moved = export_request(source, rid)
        assert moved.output_token_ids == out[rid] and moved.num_computed_tokens == len(PROMPTS[int(rid[1])]) + 6
        source.abort_request(rid)
        adopt_request(target, moved)
    _run(source, out)  # its first step returns the ABORT outputs of the moved requests (no tokens)
    _run(target, out)
    assert [out[f"r{i}"] for i in range(3)] == [r.token_ids for r in reference]
    for engine in (source, target):
        engine.block_manager.check_invariant()
        assert engine.block_manager.num_used_blocks == 0


def test_adopted_kv_is_bit_exact_and_errors_are_typed(tiny_dir: Path) -> None:
    source = _engine(tiny_dir)
    source.add_request(PROMPTS[0], PARAMS[0], request_id="a")
    with pytest.raises(InvalidRequestError, match="no computed KV"):
        export_request(source, "a")
    source.step()
    moved = export_request(source, "a")
    target = _engine(tiny_dir)
    adopt_request(target, moved)
    again = read_kv(target, "a", list(range(8)))
    assert all(torch.equal(again[layer], moved.kv[layer]) for layer in range(8))
    with pytest.raises(InvalidRequestError, match="already running"):
        adopt_request(target, moved)
    small = _engine(tiny_dir, blocks=1)
    with pytest.raises(PoolError, match="no room"):
        adopt_request(small, moved)
    small.block_manager.check_invariant()
    assert small.block_manager.num_used_blocks == 0
    partial = export_request(source, "a")
    partial.kv.pop(3)
    with pytest.raises(InvalidRequestError, match="KV covers layers"):
        adopt_request(_engine(tiny_dir), partial)
    with pytest.raises(InvalidRequestError, match="not running"):
        read_kv(source, "zzz", [0])
