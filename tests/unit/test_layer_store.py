"""Layer store: a drop frees weights and grows the KV pool by exactly the freed bytes without moving live
blocks; a restore gives the blocks back and reloads the weights, and generation goes on unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kunserve.agent.engine.config import EngineConfig
from kunserve.agent.engine.llm_engine import LLMEngine
from kunserve.agent.engine.sequence import SamplingParams
from kunserve.agent.errors import KunServeError
from kunserve.agent.layer_store import LayerStore, LayerStoreError

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
PROMPTS = [list(range(20, 45)), list(range(300, 310)), [9] * 40]


def _engine(model_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), progress=False, num_kv_blocks=40))


def _param_bytes(engine: LLMEngine, layers: range) -> int:
    return sum(p.numel() * p.element_size() for i in layers for p in engine.model.layers[str(i)].parameters())


def test_drop_grows_the_pool_by_the_freed_bytes(tiny_dir: Path) -> None:
    engine = _engine(tiny_dir)
    store = LayerStore(engine)
    cfg = engine.model_config
    old_block = engine.kv_cache.block_bytes
    expected = _param_bytes(engine, range(4, 8)) + cfg.hidden_size * 4  # layers 4..7 and the final norm
    weights = engine.weight_bytes
    result = store.drop(0, 4)
    assert result.freed_bytes == expected  # tied LM head: its matrix is the embedding, which stage 0 keeps
    assert engine.weight_bytes == weights - expected
    assert result.block_bytes == old_block // 2  # a block now holds 4 layers instead of 8
    assert result.new_blocks == expected // result.block_bytes
    assert 0 <= expected - result.new_blocks * result.block_bytes < result.block_bytes
    assert engine.block_manager.num_blocks == engine.kv_cache.num_blocks == 40 + result.new_blocks
    assert engine.model.held_layers() == [0, 1, 2, 3] and engine.model.lm_head is None
    engine.block_manager.check_invariant()


def test_live_blocks_do_not_move_and_new_blocks_are_usable(tiny_dir: Path) -> None:
    engine = _engine(tiny_dir)
    engine.add_request(PROMPTS[0], GREEDY, request_id="a")
    engine.step()
    seg0 = engine.kv_cache.segments[0]
    before = {layer: (slab.data_ptr(), slab.clone()) for layer, slab in seg0.slabs.items()}
    result = LayerStore(engine).drop(4, 8)
    assert engine.kv_cache.segments[0] is seg0
    for layer, (ptr, data) in before.items():  # every slab, dropped layers too (their KV is still to move)
        # bitwise: unwritten slots are uninitialised and may hold NaN patterns
        bits = seg0.slabs[layer].view(torch.int32)
        assert seg0.slabs[layer].data_ptr() == ptr and torch.equal(bits, data.view(torch.int32))
    new = engine.kv_cache.segments[-1]
    assert sorted(new.slabs) == [4, 5, 6, 7] and new.num_blocks == result.new_blocks
    slots = torch.tensor([new.first_block * 16, (new.first_block + new.num_blocks) * 16 - 1])
    k = torch.randn(2, engine.kv_cache.num_kv_heads, engine.kv_cache.head_dim)
    engine.kv_cache.write(6, slots, k, -k)
    gk, gv = engine.kv_cache.gather(6, slots)
    assert torch.equal(gk, k) and torch.equal(gv, -k)
    with pytest.raises(AssertionError, match="no KV for layer 1"):
        engine.kv_cache.write(1, slots, k, k)
    with pytest.raises(KunServeError, match=r"holds layers \[4, 8\)"):
        engine.step()


@pytest.mark.parametrize("checkpoint", ["tiny_dir", "tiny_untied_dir"])
@pytest.mark.parametrize("keep", [(3, 8), (0, 5), (2, 6)])
def test_restore_mid_generation_changes_no_token(
    checkpoint: str, keep: tuple[int, int], request: pytest.FixtureRequest
) -> None:
    tiny_dir: Path = request.getfixturevalue(checkpoint)
    reference = _engine(tiny_dir).generate(PROMPTS, GREEDY)
    engine = _engine(tiny_dir)
    original = {k: v.clone() for k, v in engine.model.state_dict().items()}
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, GREEDY, request_id=f"r{i}")
    outputs: dict[str, list[int]] = {f"r{i}": [] for i in range(len(PROMPTS))}
    for _ in range(6):
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
    store = LayerStore(engine)
    store.drop(*keep)  # a last, first or middle stage
    assert (engine.model.embed_tokens is None) == (keep[0] > 0)
    restored = store.restore()
    assert restored.removed_blocks > 0 and engine.block_manager.num_blocks == 40
    assert engine.model.held_layers() == list(range(8))
    state = engine.model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
    assert [outputs[f"r{i}"] for i in range(len(PROMPTS))] == [r.token_ids for r in reference]
    engine.block_manager.check_invariant()
    assert engine.block_manager.num_used_blocks == 0


def test_restore_waits_for_the_grown_blocks_to_be_free(tiny_dir: Path) -> None:
    engine = _engine(tiny_dir)
    store = LayerStore(engine)
    result = store.drop(0, 4)
    table: list[int] = []
    assert engine.block_manager.allocate_slots(table, 16 * 41)  # 41 blocks: reaches past the old 40
    with pytest.raises(LayerStoreError, match="cannot restore yet"):
        store.restore()
    assert engine.model.held_layers() == [0, 1, 2, 3]  # nothing changed
    assert engine.block_manager.num_blocks == 40 + result.new_blocks
    engine.block_manager.free(table)
    store.restore()
    assert engine.block_manager.num_blocks == 40


@pytest.mark.parametrize(("start", "end", "message"), [(0, 8, "dropping nothing"), (2, 9, "cannot keep"),
                                                        (5, 5, "cannot keep")])
def test_bad_drops_are_refused(tiny_dir: Path, start: int, end: int, message: str) -> None:
    engine = _engine(tiny_dir)
    with pytest.raises(LayerStoreError, match=message):
        LayerStore(engine).drop(start, end)
    assert engine.model.held_layers() == list(range(8))
    with pytest.raises(LayerStoreError, match="nothing to restore"):
        LayerStore(engine).restore()
