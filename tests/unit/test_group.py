"""Group pieces without processes: stage checks, block accounting across stages, zero-copy reclaim of the
pages of dropped layers, the scheduler's busy/cap rules, and the pipeline split of a model reproducing the
whole model's hidden states (stage by stage, with remote attention served from another cache)."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from kunserve.agent.engine.attention import SeqSpan
from kunserve.agent.engine.block_manager import BlockManager
from kunserve.agent.engine.kv_cache import KVCache
from kunserve.agent.engine.sampler import Sampler
from kunserve.agent.engine.scheduler import Scheduler, SchedulerConfig
from kunserve.agent.engine.sequence import SamplingParams, Sequence
from kunserve.agent.errors import PoolError
from kunserve.agent.group import GroupAllocator, GroupSeq, Stage
from kunserve.agent.member import StagePlan, check_stages
from kunserve.agent.model.loader import Checkpoint, load_model
from kunserve.agent.stage import NO_STAGE, StageExecutor, StageSeq, attend_here

torch.set_num_threads(1)


def _plans(*ranges: tuple[int, int]) -> tuple[StagePlan, ...]:
    return tuple(StagePlan(f"a{i}", f"h:{i}", s, e) for i, (s, e) in enumerate(ranges))


@pytest.mark.parametrize(("ranges", "problem"), [
    (((0, 4), (4, 8)), None),
    (((0, 3), (3, 5), (5, 8)), None),
    (((0, 8),), "at least 2 stages"),
    (((0, 4), (5, 8)), "contiguous"),
    (((0, 4), (4, 7)), "the model has 8"),
    (((0, 4), (4, 4), (4, 8)), "contiguous non-empty"),
])
def test_check_stages(ranges: tuple[tuple[int, int], ...], problem: str | None) -> None:
    got = check_stages(_plans(*ranges), 8)
    assert (got is None) if problem is None else (got is not None and problem in got)


def test_a_member_twice_is_refused() -> None:
    stages = (StagePlan("a", "h:0", 0, 4), StagePlan("a", "h:1", 4, 8))
    assert "twice" in (check_stages(stages, 8) or "")


def test_mark_used_takes_exactly_those_blocks() -> None:
    bm = BlockManager(6, 4)
    bm.mark_used([4, 1])
    table: list[int] = []
    assert bm.allocate_slots(table, 12) and table == [0, 2, 3]
    bm.check_invariant()
    with pytest.raises(PoolError):
        bm.mark_used([1])  # already used


def _group(blocks: tuple[int, ...] = (8, 8)) -> tuple[list[Stage], dict[str, GroupSeq], GroupAllocator]:
    stages = [Stage(i, f"a{i}", f"h:{i}", 4 * i, 4 * i + 4, BlockManager(n, 4)) for i, n in enumerate(blocks)]
    seqs: dict[str, GroupSeq] = {}
    return stages, seqs, GroupAllocator(stages, seqs, 4)


def test_group_allocation_is_all_or_nothing_across_stages() -> None:
    stages, seqs, alloc = _group((8, 2))
    seq = Sequence("r", [1] * 10, SamplingParams())
    seqs["r"] = GroupSeq("a0", [[], []], [True, True])
    assert not alloc.allocate(seq, 10)  # stage 1 has 2 blocks, 3 are needed
    assert stages[0].mirror.num_free_blocks == 8 and stages[1].mirror.num_free_blocks == 2
    assert alloc.allocate(seq, 8)
    assert seqs["r"].tables == [[0, 1], [0, 1]]
    assert alloc.num_free_blocks == 0 and alloc.num_blocks == 2
    alloc.free(seq)
    assert alloc.num_free_blocks == 2 and seqs["r"].tables == [[], []]


def test_a_handed_request_grows_only_where_it_keeps_blocks_and_waits_for_its_exchange() -> None:
    stages, seqs, alloc = _group()
    stages[1].mirror.mark_used([0, 1])
    seq = Sequence("old", [1] * 7, SamplingParams())  # 7 tokens in 2 pre-drop blocks on stage 1
    seqs["old"] = GroupSeq("a1", [[], [0, 1]], [False, True], kv_stage=1, pending={0, 1, 2, 3})
    assert not alloc.deferred(seq, 8) and alloc.allocate(seq, 8)
    assert seqs["old"].tables == [[], [0, 1]]  # nothing on stage 0 until its KV moves there
    assert alloc.deferred(seq, 9)  # a new block on stage 1 would have no page for layers 0-3
    seqs["old"].pending.clear()
    assert not alloc.deferred(seq, 9) and alloc.allocate(seq, 9)
    alloc.free(seq)  # preempted: it starts over as a request of the group
    assert seqs["old"].kv_stage == NO_STAGE and seqs["old"].active == [True, True]
    assert stages[1].mirror.num_free_blocks == 8


def test_a_handed_request_grows_into_pre_drop_blocks_while_they_last() -> None:
    stages, seqs, alloc = _group()
    stages[1].full_blocks = 3  # blocks 0-2 of stage 1 still have pages for every layer
    stages[1].mirror.mark_used([0, 1])
    seq = Sequence("old", [1] * 8, SamplingParams())
    seqs["old"] = GroupSeq("a1", [[], [0, 1]], [False, True], kv_stage=1, pending={0, 1, 2, 3})
    assert not alloc.deferred(seq, 9) and alloc.allocate(seq, 9)
    assert seqs["old"].tables[1] == [0, 1, 2]
    assert alloc.deferred(seq, 13)  # block 3 is post-drop: no page for layers 0-3
    seqs["old"].held_for = 0
    seqs["old"].pending = {0}
    assert alloc.deferred(seq, 12)  # held for its exchange step even though it fits


def test_reclaim_reuses_the_dropped_layers_pages_without_copying() -> None:
    cache = KVCache(list(range(8)), 2, 3, 4, torch.float32, torch.device("cpu"))
    cache.add_blocks(5)
    dropped = {layer: cache.segments[0].slabs[layer].data_ptr() for layer in range(2, 8)}
    cache.set_held_layers([0, 1])  # a 4-way drop keeps 2 of 8 layers
    cache.add_blocks(3)
    assert cache.reclaim_dropped() == 15  # 6 dropped slabs of 5 blocks = 3 segments of 5 blocks
    assert cache.num_blocks == 5 + 3 + 15
    assert all(sorted(s.slabs) == [0, 1] for s in cache.segments)
    reused = {s.slabs[layer].data_ptr() for s in cache.segments[2:] for layer in (0, 1)}
    assert reused == set(dropped.values())  # the same memory, now blocks of the held layers
    assert cache.reclaim_dropped() == 0


def test_reclaim_frees_slabs_that_do_not_fill_a_segment_into_fresh_blocks() -> None:
    cache = KVCache(list(range(5)), 2, 3, 4, torch.float32, torch.device("cpu"))
    cache.add_blocks(4)
    cache.set_held_layers([0, 1])  # 3 dropped slabs: one segment of 4 blocks, one slab left over
    assert cache.reclaim_dropped() == 4 + 2  # the leftover slab (4 blocks of 1 layer) = 2 blocks of 2 layers


def test_busy_sequences_are_skipped_and_batches_are_capped() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), BlockManager(32, 4))
    seqs = [Sequence(f"s{i}", [1, 2, 3], SamplingParams()) for i in range(4)]
    for s in seqs:
        sched.add(s)
    first = sched.schedule(max_seqs=2)
    assert [s.request_id for s in first.seqs] == ["s0", "s1"]
    for s in first.seqs:
        s.busy = True
        s.num_computed_tokens = 3
    second = sched.schedule(max_seqs=2)
    assert [s.request_id for s in second.seqs] == ["s2", "s3"]
    for s in second.seqs:
        s.busy = True
    assert sched.schedule().is_empty  # everything is in flight
    seqs[0].busy = False
    seqs[0].append_token(4)  # its micro-batch came back with a token
    assert [s.request_id for s in sched.schedule().seqs] == ["s0"]


def test_stages_with_remote_attention_reproduce_the_whole_model(tiny_model_dir: Path) -> None:
    """Stage 0 holds layers [0, 4) and stage 1 [4, 8) with the request's KV for every layer still in the old
    full cache (remote attention); the hidden states equal the whole model's over the same cache."""
    ckpt = Checkpoint(tiny_model_dir)
    cfg = ckpt.config
    full = load_model(ckpt, torch.float32, "cpu", None, False)
    first = load_model(ckpt, torch.float32, "cpu", (0, 4), False)
    second = load_model(ckpt, torch.float32, "cpu", (4, cfg.num_hidden_layers), False)

    def cache(layers: list[int]) -> KVCache:
        c = KVCache(layers, cfg.num_key_value_heads, cfg.head_dim, 4, torch.float32, torch.device("cpu"))
        c.add_blocks(8)
        return c

    ids = [5, 9, 2, 7, 7, 3]
    ref_cache, old_cache = cache(list(range(cfg.num_hidden_layers))), cache(list(range(cfg.num_hidden_layers)))
    from kunserve.agent.engine.attention import LocalAttention, build_metadata

    meta = build_metadata([SeqSpan([0, 1], 0, 6)], 4, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        want = full(torch.tensor(ids), meta.positions, LocalAttention(meta, ref_cache))
    local0 = cache(list(range(4)))

    def remote(kv_stage: int, layer: int, spans: list[SeqSpan], q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> Future[torch.Tensor]:
        assert kv_stage == 1
        fut: Future[torch.Tensor] = Future()
        fut.set_result(attend_here(old_cache, torch.float32, layer, spans, q, k, v))
        return fut

    spec = [StageSeq("r", 0, 6, ids, [[], [0, 1]], kv_stage=1, remote_layers=frozenset(range(4)))]
    s0 = StageExecutor(0, first, local0, Sampler(torch.device("cpu")), remote)
    s1 = StageExecutor(1, second, old_cache, Sampler(torch.device("cpu")), remote)
    hidden = s1.run(spec, s0.run(spec, None))
    assert s0.remote_calls == 4 and s1.remote_calls == 0
    torch.testing.assert_close(hidden, want, rtol=0, atol=1e-5)
    for layer in range(cfg.num_hidden_layers):  # every layer's KV landed where it was sent (6 positions)
        got, ref = (c.segments[0].slabs[layer][:, :2].reshape(2, 8, -1)[:, :6] for c in (old_cache, ref_cache))
        torch.testing.assert_close(got, ref)
