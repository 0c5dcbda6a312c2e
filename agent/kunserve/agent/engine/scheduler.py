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


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            assert n > 0, "a running sequence always has a token to compute"
            while not self.block_manager.allocate_slots(seq.block_table, seq.num_computed_tokens + n):
                victim = self.running.pop()  # lowest priority: admitted last
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
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            need = self.block_manager.blocks_for(seq.num_computed_tokens + n) - len(seq.block_table)
            if need > self.block_manager.num_free_blocks - self.config.watermark_blocks and self.running:
                break
            if not self.block_manager.allocate_slots(seq.block_table, seq.num_computed_tokens + n):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's blocks and forget it."""
        self.block_manager.free(seq.block_table)
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def blocks_needed(self) -> int:
        """Blocks the running and waiting sequences need to hold their tokens plus the next one."""
        bm = self.block_manager
        return sum(bm.blocks_for(s.num_tokens + 1) for s in (*self.running, *self.waiting))
