"""The leader of a cooperative group: schedules every request of the group and drives the pipeline.

After a drop, stage 0 (the leader) owns the group's scheduling and every stage's block accounting (one
BlockManager mirror per stage; its own is its real pool), so each micro-batch carries the block tables
every stage uses. A request that was running when the group formed keeps its KV where it was (kv_stage)
and decodes through remote attention for the layers that moved, while the KV exchange copies those
layers, one bounded step at a time, to the stages that now hold them. At least `depth` micro-batches are
in flight so stages overlap. A request's tokens go back to whoever follows it (EngineLoop sinks).
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kunserve.agent.engine.attention import SeqSpan
from kunserve.agent.engine.block_manager import BlockManager
from kunserve.agent.engine.llm_engine import LLMEngine
from kunserve.agent.engine.output import RequestOutput
from kunserve.agent.engine.scheduler import Scheduler
from kunserve.agent.engine.sequence import SamplingParams, Sequence
from kunserve.agent.errors import KunServeError
from kunserve.agent.stage import NO_STAGE, StageExecutor, StageSeq

log = logging.getLogger(__name__)


class GroupLostError(KunServeError):
    """A member of the group stopped answering; the group's requests fail and can be retried elsewhere."""


@dataclass(slots=True)
class Stage:
    index: int
    agent_id: str
    endpoint: str
    start: int  # layers [start, end)
    end: int
    mirror: BlockManager  # the stage's pool as the leader accounts it (the leader's own: its real pool)
    full_blocks: int = 0  # blocks [0, full_blocks) still have pages for every layer (its pool before the drop)
    reclaimed: bool = False  # pages of its dropped layers reused (see KVCache.reclaim_dropped)

    def holds(self, layer: int) -> bool:
        return self.start <= layer < self.end


@dataclass(slots=True)
class GroupSeq:
    """Where one request's KV lives in the group."""

    owner: str  # agent holding the client's stream; the request goes back there when the group splits
    tables: list[list[int]]  # blocks per stage
    active: list[bool]  # stages that keep blocks for it (all, for a request that started in the group)
    kv_stage: int = NO_STAGE  # stage holding its pre-drop KV
    pending: set[int] = field(default_factory=set)  # layers whose KV is still on kv_stage only
    held_for: int = NO_STAGE  # kept out of micro-batches until its exchange step to this stage has run


def group_seq(stages: list[Stage], owner: str, table: list[int] | None = None, kv_stage: int = NO_STAGE) -> GroupSeq:
    """Where a request's KV is when it joins a group: nowhere yet (a new request: blocks on every stage), or
    in `table` on stage kv_stage for every layer (a request from before the drop: the other stages' layers
    are pending there until the KV exchange moves them)."""
    n = len(stages)
    g = GroupSeq(owner, [[] for _ in range(n)], [True] * n)
    if table:
        g.tables[kv_stage] = list(table)
        g.active = [i == kv_stage for i in range(n)]
        g.kv_stage = kv_stage
        g.pending = {layer for s in stages if s.index != kv_stage for layer in range(s.start, s.end)}
    return g


class Transport(Protocol):
    """How the leader reaches the other stages (gRPC today; the seam for NCCL/RDMA)."""

    def forward(self, stage: int, batch_id: int, seqs: list[StageSeq], hidden: torch.Tensor) -> Future[list[int]]: ...

    def import_kv(self, stage: int, request_id: str, source: int, source_table: list[int], table: list[int],
                  num_tokens: int, layers: list[int]) -> Future[int]: ...

    def reclaim(self, stage: int) -> int: ...

    def remote_attention(self, stage: int, layer: int, spans: list[SeqSpan], q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor) -> Future[torch.Tensor]: ...


class GroupAllocator:
    """Blocks on every stage a request keeps blocks on, all or nothing."""

    def __init__(self, stages: list[Stage], seqs: dict[str, GroupSeq], block_size: int) -> None:
        self.stages, self.seqs, self.block_size = stages, seqs, block_size

    @property
    def num_free_blocks(self) -> int:
        return min(s.mirror.num_free_blocks for s in self.stages)

    @property
    def num_blocks(self) -> int:
        return min(s.mirror.num_blocks for s in self.stages)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        g = self.seqs[seq.request_id]
        want = self.blocks_for(num_tokens)
        needs = [(s, want - len(g.tables[s.index])) for s in self.stages if g.active[s.index]]
        if any(n > s.mirror.num_free_blocks for s, n in needs):
            return False
        for s, _ in needs:
            ok = s.mirror.allocate_slots(g.tables[s.index], num_tokens)
            assert ok, "checked above"
        return True

    def free(self, seq: Sequence) -> None:
        """Free its blocks everywhere; a request recomputed later starts over as a group request."""
        g = self.seqs[seq.request_id]
        for s in self.stages:
            s.mirror.free(g.tables[s.index])
        g.active = [True] * len(self.stages)
        g.kv_stage, g.pending = NO_STAGE, set()

    def deferred(self, seq: Sequence, num_tokens: int) -> bool:
        # Remote layers append to blocks on kv_stage, which need pages for those layers: pre-drop blocks
        # (ids below full_blocks, allocated lowest first). A request that would need a newer block there
        # waits for its KV exchange instead.
        g = self.seqs[seq.request_id]
        if not g.pending:
            return False
        if g.held_for != NO_STAGE:
            return True
        need = self.blocks_for(num_tokens) - len(g.tables[g.kv_stage])
        if need <= 0:
            return False
        st = self.stages[g.kv_stage]
        lowest = st.mirror.lowest_free(need)
        return len(lowest) < need or lowest[-1] >= st.full_blocks


@dataclass(slots=True)
class _InFlight:
    future: Future[list[int]]
    seqs: list[Sequence]
    samplers: list[Sequence]


@dataclass(slots=True)
class _Exchange:
    future: Future[int]
    seq: Sequence
    stage: int
    layers: list[int]


class GroupLeader:
    """Drives a group from stage 0. Runs on the leader's engine thread (the EngineLoop's driver)."""

    def __init__(self, engine: LLMEngine, epoch: int, stages: list[Stage], transport: Transport,
                 local_import: Callable[[str, int, list[int], list[int], int, list[int]], Future[int]],
                 depth: int = 2, exchange_bytes: int = 8 << 20, rpc_timeout_s: float = 30.0) -> None:
        self.engine, self.epoch, self.stages, self.transport = engine, epoch, stages, transport
        self.local_import = local_import  # ImportKV into the leader's own pool (runs off the engine thread)
        self.depth, self.exchange_bytes, self.rpc_timeout_s = depth, exchange_bytes, rpc_timeout_s
        cfg = engine.model_config
        elem = torch.empty((), dtype=engine.dtype).element_size()
        self.kv_token_layer_bytes = 2 * cfg.num_key_value_heads * cfg.head_dim * elem  # one token, one layer
        self.seqs: dict[str, GroupSeq] = {}
        self.allocator = GroupAllocator(stages, self.seqs, engine.config.block_size)
        self.scheduler = Scheduler(engine.scheduler.config, self.allocator)
        self.executor = StageExecutor(0, engine.model, engine.kv_cache, engine.sampler, transport.remote_attention)
        self.inflight: collections.deque[_InFlight] = collections.deque()
        self.exchanges: dict[int, _Exchange] = {}  # at most one step in flight per receiving stage
        self.draining = False  # no new micro-batches (a restore is pausing the group)
        self.aborted: set[str] = set()  # aborted while in flight: finished when their batch returns
        self._batch_ids = 0

    # ---- requests --------------------------------------------------------------------------------------
    def track(self, seq: Sequence, owner: str, table: list[int] | None = None, kv_stage: int = NO_STAGE) -> None:
        """Register a request: new (no KV), or handed over with its KV in `table` on stage kv_stage."""
        self.seqs[seq.request_id] = group_seq(self.stages, owner, table, kv_stage)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None,
                    owner: str) -> str:
        """A new request of the group (validated as the engine does); `owner` follows its stream."""
        rid = self.engine.add_request(prompt, params, request_id)  # queues on self.scheduler
        self.track(self.engine.sequence(rid), owner or self.stages[0].agent_id)
        return rid

    def forget(self, request_id: str) -> None:
        self.seqs.pop(request_id, None)

    def abort(self, request_id: str) -> bool:
        state = self.engine._requests.get(request_id)
        if state is None:
            return False
        if state.seq.busy:
            self.aborted.add(request_id)
            return True
        self.engine.abort_request(request_id)
        self.forget(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        e = self.engine
        return bool(e._requests or e._pending or self.inflight or self.exchanges)

    @property
    def idle(self) -> bool:
        return not self.inflight and not self.exchanges

    # ---- the loop --------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        e = self.engine
        outputs, e._pending = e._pending, []
        self._finish_exchange(block=False)
        self._collect(outputs, block=False)
        while not self.draining and len(self.inflight) < self.depth and self._launch():
            pass
        if not self.draining:
            self._start_exchange()
        if not outputs:
            if self.inflight:
                self._collect(outputs, block=True)
            elif self.exchanges:
                self._finish_exchange(block=True)
        return outputs

    def _launch(self) -> bool:
        sched = self.scheduler
        # Each of the `depth` micro-batches in flight gets its share of the sequences and of the group's token
        # budget (one agent's budget per stage), so a long queue does not make one all prefill and the other
        # all decodes, and the group prefills as fast as its members would alone.
        cap = max(1, math.ceil((len(sched.running) + len(sched.waiting)) / self.depth))
        tokens = max(1, math.ceil(sched.config.max_num_batched_tokens * len(self.stages) / self.depth))
        batch = sched.schedule(max_seqs=cap, max_tokens=tokens)
        for victim in batch.preempted:
            log.info("preempted %s (recompute)", victim.request_id)
        if batch.is_empty:
            return False
        order = sorted(range(len(batch.seqs)), key=lambda i: batch.num_new_tokens[i] != 1)  # decodes first
        seqs = [batch.seqs[i] for i in order]
        specs, samplers = [], []
        for seq, n in zip(seqs, (batch.num_new_tokens[i] for i in order), strict=True):
            g = self.seqs[seq.request_id]
            start = seq.num_computed_tokens
            sample = start + n == seq.num_tokens
            specs.append(StageSeq(
                seq.request_id, start, n, seq.token_ids[start : start + n], [list(t) for t in g.tables],
                g.kv_stage if g.pending else NO_STAGE, frozenset(g.pending), sample, seq.params,
                seq.num_output_tokens + seq.params.sample_index_offset,
            ))
            if sample:
                samplers.append(seq)
            seq.num_computed_tokens += n
            seq.busy = True
        try:
            hidden = self.executor.run(specs, None)
        except Exception as exc:  # remote attention to a member that is gone
            raise GroupLostError(f"group epoch {self.epoch}: stage 0 could not compute a micro-batch: {exc}") from exc
        self._batch_ids += 1
        self.inflight.append(_InFlight(self.transport.forward(1, self._batch_ids, specs, hidden), seqs, samplers))
        return True

    def _collect(self, outputs: list[RequestOutput], block: bool) -> None:
        e = self.engine
        while self.inflight and (block or self.inflight[0].future.done()):
            mb = self.inflight.popleft()
            block = False
            try:
                tokens = mb.future.result(timeout=self.rpc_timeout_s)
            except Exception as exc:
                raise GroupLostError(f"group epoch {self.epoch}: a stage failed a micro-batch: {exc}") from exc
            for seq in mb.seqs:
                seq.busy = False
            limit = e.context_limit()
            for seq, token in zip(mb.samplers, tokens, strict=True):
                state = e._requests.get(seq.request_id)
                if state is None or seq.request_id in self.aborted:
                    continue
                seq.append_token(token)
                out = state.on_token(token, limit)
                if out.finished:
                    self.scheduler.finish(seq)
                    del e._requests[seq.request_id]
                    self.forget(seq.request_id)
                outputs.append(out)
            for seq in mb.seqs:
                if seq.request_id in self.aborted:
                    self.aborted.discard(seq.request_id)
                    e.abort_request(seq.request_id)
                    self.forget(seq.request_id)
            outputs.extend(e._pending)
            e._pending = []

    # ---- KV exchange -----------------------------------------------------------------------------------
    def _start_exchange(self) -> None:
        """Start exchange steps, one per receiving stage that has none in flight: one request's pending
        layers held by that stage, as many as fit in `exchange_bytes` (at least one). The request is held
        out of new micro-batches until the step ran (a request is nearly always in flight otherwise), so
        each step pauses one request for one round trip. Requests that wait for their exchange go first."""
        running = [s for s in self.scheduler.running if self.seqs[s.request_id].pending]
        if not running:
            return
        for st in self.stages:
            if st.index in self.exchanges:
                continue
            seq = next((s for s in running if self.seqs[s.request_id].held_for == st.index), None)
            if seq is None:
                options = [s for s in running if self.seqs[s.request_id].held_for == NO_STAGE
                           and self.seqs[s.request_id].kv_stage != st.index
                           and any(st.holds(layer) for layer in self.seqs[s.request_id].pending)]
                if not options:
                    continue
                options.sort(key=lambda s: not self.allocator.deferred(s, s.num_computed_tokens + 1))
                seq = options[0]
                self.seqs[seq.request_id].held_for = st.index
            if not seq.busy:
                self._exchange_step(seq, st)

    def _exchange_step(self, seq: Sequence, st: Stage) -> None:
        g = self.seqs[seq.request_id]
        per_layer = max(1, seq.num_computed_tokens * self.kv_token_layer_bytes)
        layers = sorted(layer for layer in g.pending if st.holds(layer))[: max(1, self.exchange_bytes // per_layer)]
        table = g.tables[st.index]
        if not g.active[st.index]:
            if not st.mirror.allocate_slots(table, seq.num_computed_tokens):
                g.held_for = NO_STAGE  # no room on that stage yet: let it run, try again later
                return
            g.active[st.index] = True
        args = (seq.request_id, g.kv_stage, list(g.tables[g.kv_stage]), list(table), seq.num_computed_tokens, layers)
        fut = self.local_import(*args) if st.index == 0 else self.transport.import_kv(st.index, *args)
        seq.busy = True
        self.exchanges[st.index] = _Exchange(fut, seq, st.index, layers)

    def _finish_exchange(self, block: bool) -> None:
        """Account for finished exchange steps (block: wait for the oldest one)."""
        for stage, ex in list(self.exchanges.items()):
            if not (block or ex.future.done()):
                continue
            block = False
            del self.exchanges[stage]
            try:
                ex.future.result(timeout=self.rpc_timeout_s)  # bytes moved: the receiver counts them
            except Exception as exc:
                raise GroupLostError(f"group epoch {self.epoch}: KV exchange to stage {stage} failed: {exc}") from exc
            ex.seq.busy = False
            g = self.seqs.get(ex.seq.request_id)
            if g is None:
                continue
            g.pending.difference_update(ex.layers)
            g.held_for = NO_STAGE
            if ex.seq.request_id in self.aborted:
                self.aborted.discard(ex.seq.request_id)
                self.engine.abort_request(ex.seq.request_id)
                self.forget(ex.seq.request_id)
        self._reclaim_drained()

    def _reclaim_drained(self) -> None:
        """A stage none of whose pre-drop requests has KV of another stage's layers left reuses those pages."""
        busy = {g.kv_stage for g in self.seqs.values() if g.pending}
        for st in self.stages:
            if st.reclaimed or st.index in busy:
                continue
            try:
                added = self.engine.kv_cache.reclaim_dropped() if st.index == 0 else self.transport.reclaim(st.index)
            except Exception as exc:
                raise GroupLostError(f"group epoch {self.epoch}: stage {st.index} failed to reclaim: {exc}") from exc
            if added:
                st.mirror.grow(added)
            st.reclaimed = True
            log.info("stage %d reclaimed %d blocks from dropped layers", st.index, added)

    # ---- views -----------------------------------------------------------------------------------------
    def home_blocks_needed(self, owner: str) -> int:
        """Blocks (every layer) the requests owned by `owner` need: what it must hold when the group splits."""
        return sum(self.allocator.blocks_for(st.seq.num_tokens + 1) for rid, st in self.engine._requests.items()
                   if rid in self.seqs and self.seqs[rid].owner == owner)
