"""A simulated replica serving alone: the agent's real Scheduler over a real BlockManager, step times from
the deployment's StepCost. Preemption is the scheduler's own (recompute); the swap policy turns a
preemption into a swap-out instead (the KV kept in host memory, swapped back in on re-admission)."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import TYPE_CHECKING

from bench.sim.hardware import Deployment
from bench.sim.state import Context, Policy, SimRequest, StepShape
from kunserve.agent.engine.block_manager import BlockManager
from kunserve.agent.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from kunserve.agent.engine.sequence import Sequence, SequenceStatus
from kunserve.operator.plan_types import ReplicaPressure

if TYPE_CHECKING:
    from bench.sim.coop import CoopGroup


class HeapBlockManager(BlockManager):
    """BlockManager with lowest_free in O(k log k) from the free heap (the base class scans every free block;
    GroupAllocator.deferred asks for it on each scheduling pass of a request waiting for its KV)."""

    def lowest_free(self, k: int) -> list[int]:
        heap = self._free
        if k <= 0 or not heap:
            return []
        out: list[int] = []
        frontier = [(heap[0], 0)]
        while frontier and len(out) < k:
            value, i = heapq.heappop(frontier)
            out.append(value)
            for child in (2 * i + 1, 2 * i + 2):
                if child < len(heap):
                    heapq.heappush(frontier, (heap[child], child))
        return out


def solo_scheduler_config(dep: Deployment, num_blocks: int) -> SchedulerConfig:
    """What EngineConfig.scheduler_config gives the agent: the batch limits and a 1 % watermark."""
    return SchedulerConfig(max_num_seqs=dep.max_num_seqs, max_num_batched_tokens=dep.max_num_batched_tokens,
                           watermark_blocks=max(0, num_blocks // 100))


def emit_tokens(ctx: Context, sched: Scheduler, seqs: list[Sequence], now: float,
                on_done: Callable[[Sequence], None] | None = None) -> None:
    """Sequences that computed all their tokens sample one; finished ones leave the scheduler."""
    for seq in seqs:
        if seq.num_computed_tokens != seq.num_tokens:
            continue
        seq.append_token(0)
        req = ctx.requests[seq.request_id]
        if ctx.token(req, now):
            sched.finish(seq)
            if on_done is not None:
                on_done(seq)
            ctx.finished(req, now)


class Instance:
    def __init__(self, index: int, dep: Deployment, policy: Policy, ctx: Context) -> None:
        self.index = index
        self.name = f"agent-{index:03d}"  # sorts like the index: the planner orders stages by name
        self.dep, self.policy, self.ctx = dep, policy, ctx
        self.solo_blocks = dep.kv_blocks
        self.bm: BlockManager = HeapBlockManager(self.solo_blocks, dep.cost_model.block_size)
        self.sched = Scheduler(solo_scheduler_config(dep, self.solo_blocks), self.bm)
        self.inflight: ScheduledBatch | None = None
        self.group: CoopGroup | None = None
        self.pending_group: str | None = None  # a drop decided, waiting for this member's step to end
        self.on_idle: list[Callable[[float], None]] = []  # run once at the end of the current step
        self.swapped: dict[str, int] = {}  # request -> tokens of KV held in host memory (swap policy)
        self.routed = 0  # unfinished requests routed here (the gateway's in-flight count)
        self.busy_s = 0.0
        self.swap_bytes = 0

    # ---- state ---------------------------------------------------------------------------------------------
    @property
    def solo(self) -> bool:
        return self.group is None

    @property
    def idle(self) -> bool:
        return self.inflight is None

    @property
    def pool_bytes(self) -> int:
        return self.solo_blocks * self.dep.cost_model.block_bytes()

    def add(self, req: SimRequest) -> None:
        seq = req.seq if req.seq is not None else req.make_seq()
        if self.group is not None:
            self.group.add(seq, self.index)
        else:
            self.sched.add(seq)

    def pressure(self) -> ReplicaPressure:
        """What this replica's agent would report (the group's view while it is a stage)."""
        if self.group is not None:
            return self.group.member_pressure(self)
        s = self.sched
        return ReplicaPressure(
            name=self.name, model=self.dep.name, blocks_needed=s.blocks_needed(), blocks_total=self.bm.num_blocks,
            num_waiting=len(s.waiting), num_running=len(s.running), kv_pool_bytes=self.pool_bytes,
            group=self.pending_group,
        )

    def demand_sample(self) -> tuple[int, int, int]:
        """(blocks needed, blocks total, waiting) for the router."""
        p = self.pressure()
        return p.blocks_needed, p.blocks_total, p.num_waiting

    # ---- steps ---------------------------------------------------------------------------------------------
    def kick(self, now: float) -> None:
        """Start a step if this replica serves alone, is idle and has work."""
        if self.group is not None or self.inflight is not None or self.pending_group is not None:
            return
        if not self.sched.has_unfinished():
            return
        extra_bytes = 0
        for _ in range(4):  # a step that only preempted admits nothing; the next call does
            batch, extra = self._schedule(now)
            extra_bytes += extra
            if not batch.is_empty:
                break
            if not batch.preempted:
                return
        else:
            return
        shape = StepShape()
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            shape.add(seq, n)
            seq.busy = True
        dur = self.dep.step.time(shape.tokens, shape.pairs, shape.ctx, 1.0, len(shape.seqs))
        if extra_bytes:  # swapping is pipelined with compute (InferCept's swap pipelining)
            dur = max(dur, extra_bytes / self.dep.links.pcie_bw)
        dur *= self.ctx.cpu_factor()
        self.inflight = batch
        self.busy_s += dur
        self.ctx.push(now + dur, self._done)

    def _schedule(self, now: float) -> tuple[ScheduledBatch, int]:
        swap = self.policy is Policy.SWAP
        saved = {s.request_id: s.num_computed_tokens for s in self.sched.running} if swap else {}
        batch = self.sched.schedule()
        kv_token = self.dep.cost_model.kv_bytes_per_token()
        extra = 0
        for victim in batch.preempted:
            req = self.ctx.requests[victim.request_id]
            req.requeued(now)
            tokens = saved.get(victim.request_id, 0)
            if swap and tokens > 0:  # keep the KV in host memory: no recompute on re-admission
                victim.num_computed_tokens = tokens
                self.swapped[victim.request_id] = tokens
                req.swaps += 1
                extra += tokens * kv_token
        for seq in batch.seqs:
            self.ctx.requests[seq.request_id].admitted(now)
            tokens = self.swapped.pop(seq.request_id, 0)
            extra += tokens * kv_token
        self.swap_bytes += extra
        return batch, extra

    def _done(self) -> None:
        now = self.ctx.now
        batch, self.inflight = self.inflight, None
        assert batch is not None
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.busy = False
            seq.num_computed_tokens += n
        emit_tokens(self.ctx, self.sched, batch.seqs, now)
        hooks, self.on_idle = self.on_idle, []
        for hook in hooks:
            hook(now)
        self.kick(now)

    # ---- a group splitting back ----------------------------------------------------------------------------
    def adopt(self, seq: Sequence, now: float) -> bool:
        """Take a running sequence whose KV arrives here (fresh blocks for its computed tokens)."""
        table: list[int] = []
        if not self.bm.allocate_slots(table, max(seq.num_computed_tokens, 1)):
            return False
        seq.block_table = table
        seq.status = SequenceStatus.RUNNING
        self.sched.running.append(seq)
        return True

    def reset_pool(self) -> None:
        """A fresh pool of the replica's own size (after a group splits back)."""
        self.bm = HeapBlockManager(self.solo_blocks, self.dep.cost_model.block_size)
        self.sched = Scheduler(solo_scheduler_config(self.dep, self.solo_blocks), self.bm)
