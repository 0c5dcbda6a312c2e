"""Scheduler with a real BlockManager and Sequence objects (no model): chunked prefill, ordering,
admission, preemption by recompute, finish and blocks_needed. Steps are completed by hand the way
ModelRunner/LLMEngine do it: num_computed_tokens advances by the scheduled count and a sequence that
has computed all its tokens gets one new token."""

from __future__ import annotations

from kunserve.agent.engine.block_manager import BlockManager
from kunserve.agent.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from kunserve.agent.engine.sequence import SamplingParams, Sequence, SequenceStatus

NEXT_TOKEN = 7


def _seq(name: str, prompt_len: int) -> Sequence:
    return Sequence(name, list(range(100, 100 + prompt_len)), SamplingParams(max_tokens=100))


def _sched(
    num_blocks: int, block_size: int = 4, *, max_seqs: int = 64, budget: int = 512, watermark: int = 0
) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, watermark_blocks=watermark)
    return Scheduler(cfg, BlockManager(num_blocks, block_size))


def _complete(batch: ScheduledBatch) -> list[Sequence]:
    """What ModelRunner + the engine do after a forward pass; returns the sequences that sampled."""
    sampled = []
    for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(NEXT_TOKEN)
            sampled.append(seq)
    return sampled


def _plan(batch: ScheduledBatch) -> list[tuple[str, int]]:
    return [(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)]


def test_long_prompt_is_prefilled_in_chunks() -> None:
    s = _sched(64, budget=8)
    a = _seq("a", 20)
    s.add(a)
    plans, computed, tables = [], [], []
    for _ in range(5):
        batch = s.schedule()
        plans.append(_plan(batch))
        tables.append(list(a.block_table))
        _complete(batch)
        computed.append(a.num_computed_tokens)
    assert plans == [[("a", 8)], [("a", 8)], [("a", 4)], [("a", 1)], [("a", 1)]]
    assert computed == [8, 16, 20, 21, 22]
    assert a.num_tokens == 23 and a.output_token_ids == [NEXT_TOKEN] * 3
    # Blocks follow the computed tokens, one chunk at a time.
    assert tables == [[0, 1], [0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
    assert a.status is SequenceStatus.RUNNING


def test_budget_is_shared_and_decodes_go_before_new_prefills() -> None:
    s = _sched(64, budget=8)
    a = _seq("a", 5)
    s.add(a)
    b1 = s.schedule()
    assert _plan(b1) == [("a", 5)]
    _complete(b1)  # a now decodes
    b = _seq("b", 20)
    c = _seq("c", 3)
    s.add(b)
    s.add(c)
    b2 = s.schedule()
    assert _plan(b2) == [("a", 1), ("b", 7)]  # c does not fit the budget this step
    assert b2.total_tokens == 8
    _complete(b2)
    assert list(s.waiting) == [c]
    b3 = s.schedule()
    # Running first, in arrival order: a's decode, then b's next chunk; c only when budget is left.
    assert _plan(b3) == [("a", 1), ("b", 7)]
    _complete(b3)
    b4 = s.schedule()
    assert _plan(b4) == [("a", 1), ("b", 6), ("c", 1)]
    _complete(b4)
    b5 = s.schedule()
    assert _plan(b5) == [("a", 1), ("b", 1), ("c", 2)]
    assert [q.request_id for q in s.running] == ["a", "b", "c"]


def test_max_num_seqs_is_respected() -> None:
    s = _sched(64, max_seqs=2)
    seqs = [_seq(f"s{i}", 3) for i in range(5)]
    for q in seqs:
        s.add(q)
    b1 = s.schedule()
    assert _plan(b1) == [("s0", 3), ("s1", 3)]
    assert [q.request_id for q in s.waiting] == ["s2", "s3", "s4"]
    _complete(b1)
    assert _plan(s.schedule()) == [("s0", 1), ("s1", 1)]
    s.finish(seqs[0])
    b3 = s.schedule()
    assert _plan(b3) == [("s1", 1), ("s2", 3)]
    assert len(s.running) == 2


def test_admission_stops_when_blocks_run_out() -> None:
    s = _sched(5)  # 20 token slots
    a, b, c = _seq("a", 6), _seq("b", 6), _seq("c", 6)
    for q in (a, b, c):
        s.add(q)
    batch = s.schedule()
    assert _plan(batch) == [("a", 6), ("b", 6)]
    assert (a.block_table, b.block_table, c.block_table) == ([0, 1], [2, 3], [])
    assert list(s.waiting) == [c]
    assert c.status is SequenceStatus.WAITING
    assert s.block_manager.num_free_blocks == 1
    assert batch.preempted == []


def test_admission_keeps_the_watermark_only_while_something_runs() -> None:
    s = _sched(4, watermark=2)
    a, b = _seq("a", 8), _seq("b", 4)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    # a is admitted although it leaves fewer than 2 free (nothing was running); b would eat the watermark.
    assert _plan(batch) == [("a", 8)]
    assert list(s.waiting) == [b]


def test_preemption_by_recompute_of_the_most_recently_admitted() -> None:
    s = _sched(4, budget=16)
    a, b = _seq("a", 8), _seq("b", 8)
    s.add(a)
    s.add(b)
    b1 = s.schedule()
    assert _plan(b1) == [("a", 8), ("b", 8)]
    assert (a.block_table, b.block_table) == ([0, 1], [2, 3])
    _complete(b1)  # both now hold 9 tokens and need a third block
    c = _seq("c", 1)
    s.add(c)
    b2 = s.schedule()
    assert _plan(b2) == [("a", 1)]
    assert b2.preempted == [b]
    assert a.block_table == [0, 1, 2]  # got the lowest id b gave back
    assert b.block_table == []
    assert b.num_computed_tokens == 0
    assert b.num_tokens == 9  # its sampled token is kept and recomputed with the prompt
    assert b.status is SequenceStatus.WAITING
    assert b.num_preemptions == 1 and a.num_preemptions == 0
    assert s.num_preemptions == 1
    assert list(s.waiting) == [b, c]  # front of the queue, before c which arrived earlier in waiting
    assert s.running == [a]
    # One block is free and c needs only one, but a step that preempted admits nobody.
    assert s.block_manager.num_free_blocks == 1
    assert c.status is SequenceStatus.WAITING and c.block_table == []
    _complete(b2)
    # Next step: a decodes (block 2 still has room). b, first in the queue, needs 3 blocks for its 9
    # tokens and only 1 is free: admission stops at b, and c does not jump the queue.
    b3 = s.schedule()
    assert _plan(b3) == [("a", 1)]
    assert b3.preempted == []
    assert list(s.waiting) == [b, c]
    s.block_manager.check_invariant()


def test_preempted_sequence_recomputes_prompt_and_outputs() -> None:
    s = _sched(4, budget=16)
    a, b = _seq("a", 8), _seq("b", 8)
    s.add(a)
    s.add(b)
    _complete(s.schedule())
    _complete(s.schedule())  # b preempted, a decodes: a has 10 tokens
    s.finish(a)
    assert s.block_manager.num_free_blocks == 4
    batch = s.schedule()
    assert _plan(batch) == [("b", 9)]  # prompt 8 + the token it had sampled
    assert b.block_table == [0, 1, 2]
    sampled = _complete(batch)
    assert sampled == [b]
    assert b.output_token_ids == [NEXT_TOKEN, NEXT_TOKEN]


def test_a_sequence_that_cannot_grow_preempts_later_ones_but_not_earlier_ones() -> None:
    s = _sched(6, budget=64)
    a, b, c = _seq("a", 8), _seq("b", 4), _seq("c", 4)
    for q in (a, b, c):
        s.add(q)
    b1 = s.schedule()
    assert _plan(b1) == [("a", 8), ("b", 4), ("c", 4)]
    assert (a.block_table, b.block_table, c.block_table) == ([0, 1], [2], [3])
    _complete(b1)  # a: 9 tokens, b: 5, c: 5; each needs a new block; 2 are free
    b2 = s.schedule()
    # a takes block 4, b takes block 5, c finds none left and preempts itself.
    assert _plan(b2) == [("a", 1), ("b", 1)]
    assert b2.preempted == [c]
    assert (a.block_table, b.block_table, c.block_table) == ([0, 1, 4], [2, 5], [])
    assert s.running == [a, b]
    assert list(s.waiting) == [c]
    assert s.num_preemptions == 1


def test_several_victims_in_one_step() -> None:
    s = _sched(4, block_size=2, budget=64)
    a, b, c = _seq("a", 4), _seq("b", 2), _seq("c", 2)
    for q in (a, b, c):
        s.add(q)
    _complete(s.schedule())  # a: [0, 1], b: [2], c: [3]; every one needs a block next
    batch = s.schedule()
    # a evicts c (the last admitted) and takes its block; then b finds nothing free and, being the
    # last one left after a, preempts itself.
    assert batch.preempted == [c, b]
    assert _plan(batch) == [("a", 1)]
    assert a.block_table == [0, 1, 3]
    assert (b.block_table, c.block_table) == ([], [])
    assert s.running == [a]
    assert list(s.waiting) == [b, c]  # each victim goes to the front: the last one preempted is first
    assert s.num_preemptions == 2
    assert (b.num_preemptions, c.num_preemptions) == (1, 1)
    assert s.block_manager.num_free_blocks == 1


def test_finish_frees_running_and_waiting_sequences() -> None:
    s = _sched(8, budget=64, max_seqs=2)
    a, b, c = _seq("a", 9), _seq("b", 4), _seq("c", 4)
    for q in (a, b, c):
        s.add(q)
    _complete(s.schedule())
    assert s.block_manager.num_used_blocks == 4
    s.finish(a)
    assert a.status is SequenceStatus.FINISHED and a.block_table == []
    assert s.running == [b]
    assert s.block_manager.num_used_blocks == 1
    s.finish(c)  # still waiting
    assert c.status is SequenceStatus.FINISHED
    assert list(s.waiting) == []
    s.finish(b)
    assert s.running == [] and s.block_manager.num_used_blocks == 0
    assert not s.has_unfinished()
    assert s.schedule().is_empty
    s.block_manager.check_invariant()


def test_blocks_needed_counts_every_token_plus_the_next() -> None:
    s = _sched(32, budget=6)
    a, b, c = _seq("a", 3), _seq("b", 4), _seq("c", 10)
    for q in (a, b, c):
        s.add(q)
    # ceil((3+1)/4) + ceil((4+1)/4) + ceil((10+1)/4) = 1 + 2 + 3
    assert s.blocks_needed() == 6
    batch = s.schedule()
    assert _plan(batch) == [("a", 3), ("b", 3)]
    _complete(batch)  # a: 4 tokens (running), b: chunk of 3 (running), c waiting
    assert s.blocks_needed() == 2 + 2 + 3
    assert s.block_manager.num_used_blocks == 2
