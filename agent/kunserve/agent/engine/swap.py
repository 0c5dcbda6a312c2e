"""Preemption by swapping (an option, off by default): the KV-centric baseline of vLLM's `preemption_mode=swap`.

With `enable_swap(engine, bandwidth)` a preempted request's computed KV is copied out of the pool into host
memory (a real copy, so the pool's blocks are free for others) and copied back into fresh blocks when the
request is admitted again, instead of being recomputed. The transfer over PCIe is **modelled**: each copy
out or in holds the engine step for `kv bytes / bandwidth` seconds (vLLM swaps inside the step), so the
cost of swap on a machine without a PCIe link (CPU) is what the configured bandwidth says it would be.

Nothing changes for an engine that does not call `enable_swap`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kunserve.agent.engine.block_manager import BlockManager
from kunserve.agent.engine.kv_cache import KVCache
from kunserve.agent.engine.migration import read_kv_blocks, write_kv_blocks
from kunserve.agent.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from kunserve.agent.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class SwapStats:
    swap_outs: int = 0
    swap_ins: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    modelled_delay_s: float = 0.0  # the total time the modelled transfers held engine steps


class SwapScheduler(Scheduler):
    """A Scheduler whose preemption swaps KV to host memory and back (see the module docstring)."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, kv_cache: KVCache,
                 bandwidth_bytes_s: float, sleep: Callable[[float], None] = time.sleep) -> None:
        if bandwidth_bytes_s <= 0:
            raise ValueError(f"swap bandwidth must be > 0 bytes/s, got {bandwidth_bytes_s}")
        super().__init__(config, block_manager)
        self.kv_cache = kv_cache
        self.bandwidth_bytes_s = bandwidth_bytes_s
        self.sleep = sleep
        self.stats = SwapStats()
        self.swapped: dict[str, tuple[int, dict[int, torch.Tensor]]] = {}  # request id -> (tokens, host KV)

    def _transfer(self, nbytes: int) -> None:
        delay = nbytes / self.bandwidth_bytes_s
        self.stats.modelled_delay_s += delay
        self.sleep(delay)

    def _preempt(self, seq: Sequence) -> None:
        n = seq.num_computed_tokens
        if n == 0:
            super()._preempt(seq)
            return
        kv = read_kv_blocks(self.kv_cache, seq.block_table, n, self.kv_cache.layer_ids)
        nbytes = sum(t.nbytes for t in kv.values())
        self.swapped[seq.request_id] = (n, kv)
        self.allocator.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.stats.swap_outs += 1
        self.stats.bytes_out += nbytes
        self._transfer(nbytes)
        self.waiting.appendleft(seq)

    def schedule(self, max_seqs: int | None = None, max_tokens: int | None = None) -> ScheduledBatch:
        batch = super().schedule(max_seqs, max_tokens)
        for seq in batch.seqs:
            entry = self.swapped.pop(seq.request_id, None)
            if entry is None:
                continue
            n, kv = entry
            nbytes = write_kv_blocks(self.kv_cache, seq.block_table, kv)
            self.stats.swap_ins += 1
            self.stats.bytes_in += nbytes
            self._transfer(nbytes)
            assert seq.num_computed_tokens == n
        return batch

    def finish(self, seq: Sequence) -> None:
        self.swapped.pop(seq.request_id, None)
        super().finish(seq)


def enable_swap(engine: object, bandwidth_bytes_s: float) -> SwapScheduler:
    """Replace an idle LLMEngine's scheduler by a SwapScheduler over the same pool; returns it."""
    from kunserve.agent.engine.llm_engine import LLMEngine

    assert isinstance(engine, LLMEngine)
    old = engine.scheduler
    if old.has_unfinished():
        raise RuntimeError("enable swap before the engine takes requests")
    engine.scheduler = SwapScheduler(old.config, engine.block_manager, engine.kv_cache, bandwidth_bytes_s)
    return engine.scheduler
