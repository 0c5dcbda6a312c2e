"""Continuous batching: decodes and prefill chunks in one step, admission by free blocks, and
preemption by recompute when blocks run out.

Each step has a token budget (max_num_batched_tokens) and a sequence cap (max_num_seqs). Running
sequences go first in arrival order; a prompt longer than the budget is prefilled in chunks over
several steps. When a running sequence cannot get a block, the most recently admitted one is preempted:
its blocks are freed and it goes back to the front of the queue to be recomputed (prompt + tokens so
far), exactly as vLLM does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from kunserve.agent.engine.block_manager import BlockManager
from kunserve.agent.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # running sequences at most
    max_num_batched_tokens: int = 512  # tokens per step (decodes + prefill chunks)
    watermark_blocks: int = 0  # free blocks kept back when admitting, to avoid preempting at once


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # tokens each seq computes this step
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Allocator(Protocol):
    """Where a sequence's blocks come from: one pool (TableAllocator) or every stage of a group."""

    @property
    def num_free_blocks(self) -> int: ...

    @property
    def num_blocks(self) -> int:
        """Blocks a single sequence could use at most."""
        ...

    def blocks_for(self, num_tokens: int) -> int: ...

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Make room for num_tokens tokens of seq; all or nothing."""
        ...

    def free(self, seq: Sequence) -> None: ...

    def deferred(self, seq: Sequence, num_tokens: int) -> bool:
        """True when seq may not compute up to num_tokens this step (it waits for something, e.g. its KV)."""
        ...


class TableAllocator:
    """The engine's own pool: a sequence's blocks are seq.block_table."""

    def __init__(self, block_manager: BlockManager) -> None:
        self.block_manager = block_manager

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.block_manager.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return self.block_manager.blocks_for(num_tokens)

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.block_manager.allocate_slots(seq.block_table, num_tokens)

    def free(self, seq: Sequence) -> None:
        self.block_manager.free(seq.block_table)

    def deferred(self, seq: Sequence, num_tokens: int) -> bool:
        return False


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager | Allocator) -> None:
        self.config = config
        if isinstance(block_manager, BlockManager):
            self.block_manager: BlockManager | None = block_manager  # the single pool, when there is one
            self.allocator: Allocator = TableAllocator(block_manager)
        else:
            self.block_manager, self.allocator = None, block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, max_seqs: int | None = None, max_tokens: int | None = None) -> ScheduledBatch:
        """One batch: running sequences first, then admissions. max_seqs / max_tokens cap this batch (a
        pipeline leader forms several smaller batches); sequences marked busy are skipped."""
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens if max_tokens is None else max_tokens
        cap = max_seqs if max_seqs is not None else self.config.max_num_seqs
        alloc = self.allocator
        i = 0
        while i < len(self.running) and budget > 0 and len(batch.seqs) < cap:
            seq = self.running[i]
            if seq.busy:
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            assert n > 0, "a running sequence always has a token to compute"
            if alloc.deferred(seq, seq.num_computed_tokens + n):
                i += 1
                continue
            while not alloc.allocate(seq, seq.num_computed_tokens + n):
                victim = self._victim(seq)
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
        if batch.preempted:
            return batch  # no admission in a step that had to preempt
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and len(batch.seqs) < cap:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if alloc.deferred(seq, seq.num_computed_tokens + n):
                break
            need = alloc.blocks_for(seq.num_computed_tokens + n) - len(seq.block_table)
            if need > alloc.num_free_blocks - self.config.watermark_blocks and self.running:
                break
            if not alloc.allocate(seq, seq.num_computed_tokens + n):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def _victim(self, seq: Sequence) -> Sequence:
        """The lowest-priority (admitted last) running sequence that is not busy; seq itself if none."""
        for j in range(len(self.running) - 1, -1, -1):
            if not self.running[j].busy:
                return self.running.pop(j)
        self.running.remove(seq)
        return seq

    def _preempt(self, seq: Sequence) -> None:
        self.allocator.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's blocks and forget it."""
        self.allocator.free(seq)
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def blocks_needed(self) -> int:
        """Blocks the running and waiting sequences need to hold their tokens plus the next one."""
        alloc = self.allocator
        return sum(alloc.blocks_for(s.num_tokens + 1) for s in (*self.running, *self.waiting))
