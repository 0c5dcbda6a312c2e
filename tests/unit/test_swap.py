"""Preemption by swap (the vLLM swap baseline): tokens unchanged, KV copied out and back, blocks accounted."""

from __future__ import annotations

from pathlib import Path

from kunserve.agent.engine.config import EngineConfig
from kunserve.agent.engine.llm_engine import LLMEngine
from kunserve.agent.engine.scheduler import Scheduler
from kunserve.agent.engine.sequence import SamplingParams
from kunserve.agent.engine.swap import SwapScheduler, enable_swap

PROMPTS = [list(range(20, 45)), list(range(300, 330)), [9] * 40, list(range(60, 95))]
PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _engine(model_dir: Path, blocks: int) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), progress=False, num_kv_blocks=blocks, block_size=16))


def test_swap_preemption_keeps_tokens_and_accounts_blocks(tiny_dir: Path) -> None:
    reference = _engine(tiny_dir, 64).generate(PROMPTS, PARAMS)
    engine = _engine(tiny_dir, 10)  # 4 requests need up to 4 blocks each: preemption is certain
    delays: list[float] = []
    sched = enable_swap(engine, bandwidth_bytes_s=1e9)
    sched.sleep = delays.append
    assert isinstance(engine.scheduler, SwapScheduler)
    out = engine.generate(PROMPTS, PARAMS)
    assert [o.token_ids for o in out] == [r.token_ids for r in reference]
    stats = sched.stats
    assert stats.swap_outs > 0 and stats.swap_ins == stats.swap_outs
    assert stats.bytes_in == stats.bytes_out > 0
    assert sum(delays) == stats.modelled_delay_s == (stats.bytes_in + stats.bytes_out) / 1e9
    assert not sched.swapped
    engine.block_manager.check_invariant()
    assert engine.block_manager.num_used_blocks == 0


def test_aborting_a_swapped_request_forgets_its_host_copy(tiny_dir: Path) -> None:
    engine = _engine(tiny_dir, 10)
    sched = enable_swap(engine, bandwidth_bytes_s=1e12)
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, PARAMS, request_id=f"r{i}")
    while not sched.swapped:
        engine.step()
    rid = next(iter(sched.swapped))
    assert engine.abort_request(rid)
    assert rid not in sched.swapped
    while engine.has_unfinished_requests():
        engine.step()
    engine.block_manager.check_invariant()
    assert engine.block_manager.num_used_blocks == 0


def test_default_engine_keeps_recompute(tiny_dir: Path) -> None:
    assert type(_engine(tiny_dir, 16).scheduler) is Scheduler
