"""A group's live KV exchange, after GroupLeader (_start_exchange, _exchange_step, _finish_exchange,
_reclaim_drained): requests running at the drop ("stale") keep their KV on the stage they were on; per
receiving stage one exchange step is in flight at a time, moving that stage's layers of one request (at most
exchange_bytes); the request is chosen held first, then one that waits for its exchange (GroupAllocator
.deferred), then the first stale one in running order. HELD mode holds the request out of micro-batches for
its step (what GroupLeader does); BULK mode does not (the paper's background copy).

Reclaiming the pages of the dropped layers in the pre-drop blocks: HELD (as KVCache.reclaim_dropped is used
today) reuses them once every pre-drop request of the stage has moved its KV, so until then the receiving
stages need fresh room for all the KV coming in; BULK reuses a request's pages as soon as its KV has moved
(the paper's exchange, about memory-neutral), the rest once the stage's last stale request has moved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import StrEnum

from bench.sim.hardware import Deployment
from bench.sim.state import Context
from kunserve.agent.engine.sequence import Sequence
from kunserve.agent.group import GroupAllocator, GroupSeq, Stage
from kunserve.agent.stage import NO_STAGE


class ExchangeMode(StrEnum):
    HELD = "held"  # GroupLeader today: request held for its step; pages reused once the whole stage moved
    BULK = "bulk"  # the paper's: background copies at link bandwidth, pages reused request by request


class KVExchange:
    def __init__(self, ctx: Context, dep: Deployment, stages: list[Stage], seqs: dict[str, GroupSeq],
                 allocator: GroupAllocator, mode: ExchangeMode, step_bytes: int,
                 on_step_done: Callable[[float], None]) -> None:
        self.ctx, self.dep, self.stages, self.seqs, self.allocator = ctx, dep, stages, seqs, allocator
        self.mode, self.step_bytes, self.on_step_done = mode, step_bytes, on_step_done
        layers = dep.cost_model.num_layers
        self.kv_token_layer = dep.cost_model.kv_bytes_per_token_layer
        # pages of a stage's dropped layers in its pre-drop blocks, as blocks of the layers it keeps
        self.reclaim = [st.full_blocks * (layers - (st.end - st.start)) // (st.end - st.start) for st in stages]
        self.left: dict[tuple[str, int], int] = {}  # (request, stage) -> its layers of that stage still pending
        self.was_stale: dict[str, int] = {}  # stale request -> kv_stage (GroupAllocator.free clears pending)
        self.todo: list[dict[str, Sequence]] = [{} for _ in stages]  # per receiving stage, in running order
        self.stale_on = [0] * len(stages)  # stale requests per kv_stage
        self.reclaimed = [0] * len(stages)  # blocks already added back from dropped layers' pages
        self.inflight: dict[int, tuple[Sequence, list[int], int]] = {}  # receiving stage -> its step
        self.bytes = 0

    def track(self, seq: Sequence, kv_stage: int) -> None:
        """A request handed over with its KV on kv_stage (call after GroupSeq.pending is set)."""
        rid = seq.request_id
        for st in self.stages:
            if st.index != kv_stage:
                self.left[rid, st.index] = st.end - st.start
                self.todo[st.index][rid] = seq
        self.was_stale[rid] = kv_stage
        self.stale_on[kv_stage] += 1

    def settled(self, rids: Iterable[str]) -> None:
        """These requests left the group or were preempted (GroupAllocator.free made them fresh requests)."""
        for rid in rids:
            kv = self.was_stale.pop(rid, None)
            if kv is not None:
                self._unstale(rid, kv)

    def _unstale(self, rid: str, kv_stage: int) -> None:
        self.stale_on[kv_stage] -= 1
        for todo in self.todo:
            todo.pop(rid, None)

    def start(self, now: float) -> None:
        held = self.mode is ExchangeMode.HELD
        # GroupAllocator.deferred for a request needing one more block on kv_stage k: the lowest free id there is
        # not a pre-drop block (computed once per stage, not once per candidate)
        full = [not (low := st.mirror.lowest_free(1)) or low[0] >= st.full_blocks for st in self.stages]
        scan = any(full)  # else only a request needing several blocks at once could be deferred: take the first
        for st in self.stages:
            if st.index in self.inflight:
                continue
            todo = self.todo[st.index]
            seq = None
            if held:
                seq = next((s for s in todo.values() if self.seqs[s.request_id].held_for == st.index), None)
            if seq is None:
                first = None
                for cand in todo.values():
                    if self.seqs[cand.request_id].held_for != NO_STAGE:
                        continue
                    first = first or cand
                    if not scan or self._deferred(cand, full):
                        seq = cand
                        break
                seq = seq or first
                if seq is None:
                    continue
                if held:
                    self.seqs[seq.request_id].held_for = st.index
            if not held or not seq.busy:
                self._step(seq, st, now)

    def _deferred(self, seq: Sequence, full: list[bool]) -> bool:
        g = self.seqs[seq.request_id]
        need = self.allocator.blocks_for(seq.num_computed_tokens + 1) - len(g.tables[g.kv_stage])
        if need <= 0:
            return False
        return full[g.kv_stage] if need == 1 else self.allocator.deferred(seq, seq.num_computed_tokens + 1)

    def _step(self, seq: Sequence, st: Stage, now: float) -> None:
        g = self.seqs[seq.request_id]
        per_layer = max(1, seq.num_computed_tokens * self.kv_token_layer)
        layers = sorted(x for x in g.pending if st.start <= x < st.end)[: max(1, self.step_bytes // per_layer)]
        if not g.active[st.index]:
            if not st.mirror.allocate_slots(g.tables[st.index], seq.num_computed_tokens):
                g.held_for = NO_STAGE  # no room on that stage yet: it runs on, tried again later
                return
            g.active[st.index] = True
        bw = self.dep.links.kv_bw
        if self.mode is ExchangeMode.HELD:
            seq.busy = True
        else:
            bw /= max(1, len(self.stages) - 1)  # each member sends to g - 1 peers at once
        nbytes = len(layers) * per_layer
        self.inflight[st.index] = (seq, layers, nbytes)
        self.ctx.push(now + self.dep.links.hop_latency_s + nbytes / bw, self._done, st.index)

    def _done(self, stage: int) -> None:
        seq, layers, nbytes = self.inflight.pop(stage)
        if self.mode is ExchangeMode.HELD:
            seq.busy = False
        self.bytes += nbytes
        rid = seq.request_id
        g = self.seqs.get(rid)
        if g is not None and g.pending:
            g.pending.difference_update(layers)
            g.held_for = NO_STAGE
            self.left[rid, stage] -= len(layers)
            if self.left[rid, stage] <= 0:
                self.todo[stage].pop(rid, None)
            if not g.pending:
                if self.mode is ExchangeMode.BULK:
                    self._reclaim_request(g)
                self.settled([rid])
        self.reclaim_drained()
        self.on_step_done(self.ctx.now)

    def _reclaim_request(self, g: GroupSeq) -> None:
        """The dropped layers' pages of the pre-drop blocks a request that moved all its KV held."""
        st = self.stages[g.kv_stage]
        n = st.end - st.start
        old = sum(1 for b in g.tables[g.kv_stage] if b < st.full_blocks)
        add = min(old * (self.dep.cost_model.num_layers - n) // n, self.reclaim[st.index] - self.reclaimed[st.index])
        if add > 0:
            st.mirror.grow(add)
            self.reclaimed[st.index] += add

    def reclaim_drained(self) -> None:
        for st in self.stages:
            if not st.reclaimed and self.stale_on[st.index] == 0:
                add = self.reclaim[st.index] - self.reclaimed[st.index]
                if add > 0:
                    st.mirror.grow(add)
                    self.reclaimed[st.index] += add
                st.reclaimed = True

    def remote_layers(self, seqs: Iterable[Sequence]) -> int:
        """Layers whose KV some of these requests still have on another stage (remote attention)."""
        remote: set[int] = set()
        for seq in seqs:
            g = self.seqs[seq.request_id]
            if g.pending:
                remote |= g.pending
        return len(remote)

