"""BlockManager: exact block ids, all-or-nothing allocation, grow/shrink, and a model check of random
operations."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kunserve.agent.engine.block_manager import BlockManager
from kunserve.agent.errors import PoolError


def test_fresh_manager_hands_out_lowest_ids_first() -> None:
    bm = BlockManager(8, 4)
    table: list[int] = []
    assert bm.allocate_slots(table, 9)
    assert table == [0, 1, 2]
    assert (bm.num_used_blocks, bm.num_free_blocks, bm.num_blocks) == (3, 5, 8)
    bm.check_invariant()


def test_allocate_extends_an_existing_table_only_by_what_is_missing() -> None:
    bm = BlockManager(8, 4)
    a: list[int] = []
    b: list[int] = []
    assert bm.allocate_slots(a, 4)
    assert bm.allocate_slots(b, 1)
    assert bm.allocate_slots(a, 4)  # already holds 4 tokens: nothing new
    assert a == [0]
    assert bm.allocate_slots(a, 5)
    assert (a, b) == ([0, 2], [1])
    assert bm.allocate_slots(a, 3)  # fewer tokens than held: no-op, never frees
    assert a == [0, 2]
    assert bm.num_used_blocks == 3


def test_allocate_is_all_or_nothing() -> None:
    bm = BlockManager(4, 4)
    a: list[int] = []
    assert bm.allocate_slots(a, 8)
    b: list[int] = []
    assert not bm.allocate_slots(b, 12)  # needs 3, only 2 free
    assert b == []
    assert (bm.num_used_blocks, bm.num_free_blocks) == (2, 2)
    assert not bm.allocate_slots(a, 17)  # a needs 5 - 2 = 3 more, 2 free
    assert a == [0, 1]
    assert (bm.num_used_blocks, bm.num_free_blocks) == (2, 2)
    assert bm.allocate_slots(a, 16)  # exactly the rest
    assert a == [0, 1, 2, 3]
    assert bm.num_free_blocks == 0
    bm.check_invariant()


def test_free_returns_blocks_and_lowest_ids_are_reused_first() -> None:
    bm = BlockManager(8, 4)
    a: list[int] = []
    b: list[int] = []
    c: list[int] = []
    assert bm.allocate_slots(a, 8)  # 0, 1
    assert bm.allocate_slots(b, 8)  # 2, 3
    assert bm.allocate_slots(c, 8)  # 4, 5
    assert (a, b, c) == ([0, 1], [2, 3], [4, 5])
    bm.free(c)
    bm.free(a)
    assert a == [] and c == []
    assert (bm.num_used_blocks, bm.num_free_blocks) == (2, 6)
    d: list[int] = []
    assert bm.allocate_slots(d, 16)
    assert d == [0, 1, 4, 5]
    e: list[int] = []
    assert bm.allocate_slots(e, 1)
    assert e == [6]
    bm.check_invariant()


def test_free_twice_is_caught() -> None:
    bm = BlockManager(4, 4)
    a: list[int] = []
    assert bm.allocate_slots(a, 4)
    stale = list(a)
    bm.free(a)
    with pytest.raises(AssertionError):
        bm.free(stale)


def test_grow_adds_next_ids_and_live_blocks_keep_theirs() -> None:
    bm = BlockManager(8, 4)
    a: list[int] = []
    assert bm.allocate_slots(a, 32)  # every block
    assert a == list(range(8))
    new = bm.grow(4)
    assert list(new) == [8, 9, 10, 11]
    assert a == list(range(8))
    assert (bm.num_blocks, bm.num_used_blocks, bm.num_free_blocks) == (12, 8, 4)
    b: list[int] = []
    assert bm.allocate_slots(b, 5)
    assert b == [8, 9]
    bm.free(a)
    c: list[int] = []
    assert bm.allocate_slots(c, 1)
    assert c == [0]  # after freeing, low ids again come first
    bm.check_invariant()


@pytest.mark.parametrize("n", [0, -3])
def test_grow_by_non_positive_is_refused(n: int) -> None:
    bm = BlockManager(8, 4)
    with pytest.raises(PoolError):
        bm.grow(n)
    assert (bm.num_blocks, bm.num_free_blocks) == (8, 8)


def test_shrink_only_when_top_ids_are_free() -> None:
    bm = BlockManager(8, 4)
    low: list[int] = []
    assert bm.allocate_slots(low, 8)  # 0, 1
    assert bm.can_shrink(6)
    assert not bm.can_shrink(7)
    assert not bm.can_shrink(0)
    assert not bm.can_shrink(9)
    with pytest.raises(PoolError, match="1 of them are in use"):
        bm.shrink(7)
    assert (bm.num_blocks, bm.num_used_blocks, bm.num_free_blocks) == (8, 2, 6)
    bm.check_invariant()
    bm.shrink(6)
    assert (bm.num_blocks, bm.num_used_blocks, bm.num_free_blocks) == (2, 2, 0)
    assert low == [0, 1]
    bm.check_invariant()


def test_shrink_refused_while_a_high_block_is_in_use_nothing_changes() -> None:
    bm = BlockManager(8, 4)
    tables = [[] for _ in range(8)]
    for t in tables:
        assert bm.allocate_slots(t, 1)
    for t in tables[:7]:
        bm.free(t)
    assert tables[7] == [7]
    for n in (1, 4, 8):
        assert not bm.can_shrink(n)
        with pytest.raises(PoolError):
            bm.shrink(n)
        assert (bm.num_blocks, bm.num_used_blocks, bm.num_free_blocks) == (8, 1, 7)
    x: list[int] = []
    assert bm.allocate_slots(x, 28)  # the 7 free blocks are still all usable
    assert x == [0, 1, 2, 3, 4, 5, 6]
    bm.check_invariant()


@pytest.mark.parametrize("n", [0, -1, 13])
def test_shrink_out_of_range_is_a_pool_error(n: int) -> None:
    bm = BlockManager(12, 4)
    with pytest.raises(PoolError):
        bm.shrink(n)
    assert bm.num_blocks == 12


def test_shrink_after_grow_restores_the_pool() -> None:
    bm = BlockManager(8, 4)
    a: list[int] = []
    assert bm.allocate_slots(a, 30)  # 0..7
    bm.grow(4)
    b: list[int] = []
    assert bm.allocate_slots(b, 9)  # 8, 9, 10
    assert b == [8, 9, 10]
    assert not bm.can_shrink(4)
    with pytest.raises(PoolError, match="3 of them are in use"):
        bm.shrink(4)
    bm.free(b)
    bm.shrink(4)
    assert (bm.num_blocks, bm.num_used_blocks, bm.num_free_blocks) == (8, 8, 0)
    assert a == list(range(8))
    bm.free(a)
    assert (bm.num_blocks, bm.num_used_blocks, bm.num_free_blocks) == (8, 0, 8)
    c: list[int] = []
    assert not bm.allocate_slots(c, 33)  # ids 8..11 are gone
    assert bm.allocate_slots(c, 32)
    assert c == list(range(8))
    bm.check_invariant()


@pytest.mark.parametrize(
    ("block_size", "tokens", "blocks"),
    [(4, 0, 0), (4, 1, 1), (4, 4, 1), (4, 5, 2), (4, 8, 2), (4, 9, 3), (16, 16, 1), (16, 17, 2), (1, 7, 7)],
)
def test_blocks_for(block_size: int, tokens: int, blocks: int) -> None:
    assert BlockManager(0, block_size).blocks_for(tokens) == blocks


def test_allocate_zero_tokens_takes_nothing() -> None:
    bm = BlockManager(2, 4)
    t: list[int] = []
    assert bm.allocate_slots(t, 0)
    assert t == [] and bm.num_free_blocks == 2


@pytest.mark.parametrize(("blocks", "size"), [(4, 0), (4, -1), (-1, 4)])
def test_bad_construction(blocks: int, size: int) -> None:
    with pytest.raises(ValueError):
        BlockManager(blocks, size)


# ---- random operations against a model -------------------------------------------------------------------

NUM_SEQS = 4
BLOCK_SIZE = 3


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives a BlockManager with random allocations, frees, grows and shrinks and checks every step
    against a plain model: which ids are free, which table holds what, and the lowest-id-first rule."""

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(6, BLOCK_SIZE)
        self.total = 6
        self.free_ids: set[int] = set(range(6))
        self.tokens = [0] * NUM_SEQS
        self.tables: list[list[int]] = [[] for _ in range(NUM_SEQS)]

    @rule(seq=st.integers(0, NUM_SEQS - 1), add=st.integers(1, 10))
    def append_tokens(self, seq: int, add: int) -> None:
        target = self.tokens[seq] + add
        need = -(-target // BLOCK_SIZE) - len(self.tables[seq])
        expected_new = sorted(self.free_ids)[: max(need, 0)]
        before = list(self.tables[seq])
        ok = self.bm.allocate_slots(self.tables[seq], target)
        if need > len(self.free_ids):
            assert not ok
            assert self.tables[seq] == before
        else:
            assert ok
            assert self.tables[seq] == before + expected_new
            self.free_ids -= set(expected_new)
            self.tokens[seq] = target

    @rule(seq=st.integers(0, NUM_SEQS - 1))
    def free(self, seq: int) -> None:
        self.free_ids |= set(self.tables[seq])
        self.bm.free(self.tables[seq])
        assert self.tables[seq] == []
        self.tokens[seq] = 0

    @rule(n=st.integers(1, 5))
    def grow(self, n: int) -> None:
        new = self.bm.grow(n)
        assert list(new) == list(range(self.total, self.total + n))
        self.free_ids |= set(new)
        self.total += n

    @rule(n=st.integers(0, 12))
    def shrink(self, n: int) -> None:
        top = set(range(self.total - n, self.total))
        expected = 0 < n <= self.total and top <= self.free_ids
        assert self.bm.can_shrink(n) == expected
        if expected:
            self.bm.shrink(n)
            self.free_ids -= top
            self.total -= n
        else:
            with pytest.raises(PoolError):
                self.bm.shrink(n)

    @precondition(lambda self: any(self.tables))
    @rule(data=st.data())
    def shrink_everything_free_above_the_highest_used(self, data: st.DataObject) -> None:
        used = set(range(self.total)) - self.free_ids
        highest = max(used)
        n = self.total - highest - 1
        if n > 0:
            assert self.bm.can_shrink(n)
            self.bm.shrink(n)
            self.free_ids -= set(range(highest + 1, self.total))
            self.total = highest + 1
        assert not self.bm.can_shrink(n + 1)

    @invariant()
    def accounting_matches_the_model(self) -> None:
        bm = self.bm
        bm.check_invariant()
        assert bm.num_blocks == self.total
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
        assert bm.num_free_blocks == len(self.free_ids)
        held = [b for t in self.tables for b in t]
        assert len(held) == len(set(held)), "a block is in two tables"
        assert set(held) == set(range(self.total)) - self.free_ids
        assert bm.num_used_blocks == len(held)
        for tokens, table in zip(self.tokens, self.tables, strict=True):
            assert len(table) == bm.blocks_for(tokens)
            assert all(0 <= b < self.total for b in table)


BlockManagerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestBlockManagerMachine = BlockManagerMachine.TestCase
