"""A simulated cooperative group: the agent's real Scheduler over the real GroupAllocator (one BlockManager
per stage, the members' own pools grown in place by the bytes their dropped layers freed).

It follows GroupLeader (agent/kunserve/agent/group.py): requests running at the drop keep their KV on the
stage they were on and decode through remote attention until the KV exchange (bench/sim/exchange.py) has
moved every layer they need to the stage that holds it. Micro-batches: LEADER limits form them as
GroupLeader._launch does (ceil(requests / depth) sequences, the leader's token budget each); POOLED limits
give a group what its g members computed alone (g x the sequence cap, g x the token budget per round,
shared evenly by the micro-batches). Timing: a round launches up to `depth` micro-batches; a micro-batch
visits every stage (its layer share of the step cost) plus one hop per stage, and waits one round trip per
layer whose KV a request still has elsewhere; the round ends when the slower of (one micro-batch's trip, one
stage's share of all micro-batches) is done. Restore: weights staged while serving (restore_prepare_s), then
a pause that moves every request's KV home and reloads the weights, and the members serve alone again with
fresh pools (a request that no longer fits is recomputed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum

from bench.sim.exchange import ExchangeMode, KVExchange
from bench.sim.instance import Instance, emit_tokens, solo_scheduler_config
from bench.sim.state import Context, StepShape
from kunserve.agent.engine.scheduler import Scheduler, SchedulerConfig
from kunserve.agent.engine.sequence import Sequence, SequenceStatus
from kunserve.agent.group import GroupAllocator, GroupSeq, Stage, group_seq
from kunserve.agent.stage import NO_STAGE
from kunserve.operator.plan_types import GroupPlan, ReplicaPressure

MIB = 1 << 20
ADMIT_PER_MICRO_BATCH = 64  # POOLED: room for admissions on top of a micro-batch's share of the decodes


class GroupLimits(StrEnum):
    LEADER = "leader"  # the leader's own SchedulerConfig for every micro-batch (what GroupLeader does today)
    POOLED = "pooled"  # what g replicas computed per step: g x the sequence cap, g x the token budget per round,
    # split evenly over the micro-batches (decodes and budget), so the stages stay balanced


@dataclass(slots=True, frozen=True)
class CoopSettings:
    depth: int = 2  # micro-batches in flight (GroupLeader's default)
    limits: GroupLimits = GroupLimits.POOLED
    exchange: ExchangeMode = ExchangeMode.BULK
    exchange_bytes: int = 8 * MIB  # bound of one KV exchange step (GroupLeader's default)


class CoopGroup:
    def __init__(self, ctx: Context, plan: GroupPlan, members: list[Instance], settings: CoopSettings,
                 now: float, on_split: Callable[[CoopGroup, float], None]) -> None:
        self.ctx, self.plan, self.members, self.settings = ctx, plan, members, settings
        self.on_split = on_split  # the simulator's: the members serve alone again
        self.group_id = plan.group_id
        self.dep = dep = members[0].dep
        cost = dep.cost_model
        layers = cost.num_layers
        self.stages: list[Stage] = []
        for i, (inst, sp) in enumerate(zip(members, plan.stages, strict=True)):
            if inst.name != sp.replica:
                raise ValueError(f"stage {i} is {sp.replica}, member is {inst.name}")
            full, n = inst.bm.num_blocks, sp.num_layers
            grow = cost.freed_bytes(sp.layer_start, sp.layer_end) // cost.block_bytes(n)
            if grow > 0:
                inst.bm.grow(grow)
            self.stages.append(Stage(i, inst.name, "", sp.layer_start, sp.layer_end, inst.bm, full_blocks=full))
        self.fractions = [(st.end - st.start) / layers for st in self.stages]
        self.seqs: dict[str, GroupSeq] = {}
        self.allocator = GroupAllocator(self.stages, self.seqs, cost.block_size)
        self.exchange = KVExchange(ctx, dep, self.stages, self.seqs, self.allocator, settings.exchange,
                                   settings.exchange_bytes, self.poke)
        self.round_budget = 0
        self.sched = Scheduler(self._config(), self.allocator)
        owner = {s.request_id: m.name for m in members for s in (*m.sched.running, *m.sched.waiting)}
        running = sorted((s for m in members for s in m.sched.running), key=lambda s: s.arrival_time)
        waiting = sorted((s for m in members for s in m.sched.waiting), key=lambda s: s.arrival_time)
        index = {m.name: i for i, m in enumerate(members)}
        for seq in running:  # handed over with their KV where it is (GroupLeader.track)
            table, seq.block_table = seq.block_table, []
            self._track(seq, owner[seq.request_id], table, index[owner[seq.request_id]])
            self.sched.running.append(seq)
        for seq in waiting:
            self._track(seq, owner[seq.request_id])
            self.sched.waiting.append(seq)
        for m in members:
            m.sched.running.clear()
            m.sched.waiting.clear()
            m.group, m.pending_group = self, None
        self.inflight: list[StepShape] | None = None
        self.paused, self.draining, self.restoring = True, False, False
        self.rounds = 0
        self._cache: tuple[float, int, dict[str, int]] | None = None
        self.exchange.reclaim_drained()
        ctx.push(now + dep.links.drop_pause_s, self._resume)

    def _config(self) -> SchedulerConfig:
        base = solo_scheduler_config(self.dep, self.members[0].solo_blocks)
        if self.settings.limits is GroupLimits.LEADER:
            return base
        g = len(self.stages)
        self.round_budget = base.max_num_batched_tokens * g
        return SchedulerConfig(max_num_seqs=base.max_num_seqs * g, max_num_batched_tokens=self.round_budget,
                               watermark_blocks=min(s.mirror.num_blocks for s in self.stages) // 100)

    def _track(self, seq: Sequence, owner: str, table: list[int] | None = None, kv_stage: int = NO_STAGE) -> None:
        self.seqs[seq.request_id] = group_seq(self.stages, owner, table, kv_stage)  # the leader's own rule
        if table:
            self.exchange.track(seq, kv_stage)

    def _forget(self, seq: Sequence) -> None:
        self.exchange.settled([seq.request_id])
        self.seqs.pop(seq.request_id, None)

    @property
    def kv_bytes_exchanged(self) -> int:
        return self.exchange.bytes

    def add(self, seq: Sequence, owner_index: int) -> None:
        self._track(seq, self.ctx_member(owner_index).name)
        self.sched.add(seq)

    def ctx_member(self, instance_index: int) -> Instance:
        return next(m for m in self.members if m.index == instance_index)

    @property
    def idle(self) -> bool:
        return self.inflight is None and not self.exchange.inflight

    # ---- pressure ------------------------------------------------------------------------------------------
    def member_pressure(self, inst: Instance) -> ReplicaPressure:
        now = self.ctx.now
        if self._cache is None or self._cache[0] != now:
            needed, homes = 0, {m.name: 0 for m in self.members}
            for seq in (*self.sched.running, *self.sched.waiting):
                blocks = self.allocator.blocks_for(seq.num_tokens + 1)
                needed += blocks
                homes[self.seqs[seq.request_id].owner] += blocks
            self._cache = (now, needed, homes)
        _, needed, homes = self._cache
        st = self.stages[self.members.index(inst)]
        return ReplicaPressure(
            name=inst.name, model=self.dep.name, blocks_needed=needed, blocks_total=st.mirror.num_blocks,
            num_waiting=len(self.sched.waiting), num_running=len(self.sched.running),
            kv_pool_bytes=inst.pool_bytes + self.dep.cost_model.freed_bytes(st.start, st.end),
            group=self.group_id, home_blocks_needed=homes[inst.name],
        )

    # ---- rounds --------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        self.paused = False
        self.poke(self.ctx.now)

    def poke(self, now: float) -> None:
        """Start what can start now: the restore's pause once drained, else a round and exchange steps."""
        if self.draining:
            if self.idle and not self.paused:
                self._commit_restore(now)
            return
        self.kick(now)
        if not self.paused:
            self.exchange.start(now)

    def kick(self, now: float) -> None:
        if self.inflight is not None or self.paused or self.draining:
            return
        s, depth = self.sched, self.settings.depth
        mbs: list[StepShape] = []
        pooled = self.settings.limits is GroupLimits.POOLED
        left = self.round_budget if pooled else 0
        for _ in range(depth + 4):
            if len(mbs) >= depth or (pooled and left <= 0):
                break
            hidden: list[Sequence] = []
            if pooled:  # an even share of what the round has left: budget, and the running requests not batched
                share = depth - len(mbs)
                free = [x for x in s.running if not x.busy]
                take = math.ceil(len(free) / share)
                hidden = free[take:]  # marked busy for this call only: the scheduler skips them
                for x in hidden:
                    x.busy = True
                s.config = replace(s.config, max_num_batched_tokens=math.ceil(left / share))
                cap = take + ADMIT_PER_MICRO_BATCH
            else:  # GroupLeader._launch
                cap = max(1, math.ceil((len(s.running) + len(s.waiting)) / depth))
            batch = s.schedule(max_seqs=cap)
            for x in hidden:
                x.busy = False
            for victim in batch.preempted:
                self.ctx.requests[victim.request_id].requeued(now)
            self.exchange.settled(v.request_id for v in batch.preempted)  # GroupAllocator.free reset them
            if batch.is_empty:
                if batch.preempted:
                    continue
                break
            shape = StepShape()
            for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
                self.ctx.requests[seq.request_id].admitted(now)
                shape.add(seq, n)
                seq.num_computed_tokens += n
                seq.busy = True
            left -= shape.tokens
            mbs.append(shape)
        if not mbs:
            return
        self.inflight = mbs
        self.rounds += 1
        self.ctx.push(now + self._round_time(mbs) * self.ctx.cpu_factor(len(self.members)), self._done)

    def _round_time(self, mbs: list[StepShape]) -> float:
        dep, links, g = self.dep, self.dep.links, len(self.stages)
        occupancy = [0.0] * g
        worst = 0.0
        for shape in mbs:
            stage_s = [dep.step.time(shape.tokens, shape.pairs, shape.ctx, f) for f in self.fractions]
            stage_s[-1] += len(shape.seqs) * dep.step.seq_s  # sampling on the last stage
            hop = links.hop_latency_s + shape.hidden_tokens * dep.hidden_size * dep.dtype_bytes / links.hop_bw
            # remote attention: one round trip per layer whose KV some request still has elsewhere
            remote_s = self.exchange.remote_layers(shape.seqs) * 2 * links.hop_latency_s
            for i, t in enumerate(stage_s):
                occupancy[i] += t
            worst = max(worst, sum(stage_s) + g * hop + remote_s)
            for seq in shape.seqs:
                req = self.ctx.requests[seq.request_id]
                if req.first_token is None:
                    req.hop_s += g * hop + remote_s
        return max(worst, max(occupancy))

    def _done(self) -> None:
        now = self.ctx.now
        mbs, self.inflight = self.inflight, None
        assert mbs is not None
        for shape in mbs:
            for seq in shape.seqs:
                seq.busy = False
        for shape in mbs:
            emit_tokens(self.ctx, self.sched, shape.seqs, now, on_done=self._forget)
        self.exchange.reclaim_drained()
        self.poke(now)

    # ---- restore -------------------------------------------------------------------------------------------
    def begin_restore(self, now: float) -> None:
        self.restoring = True
        self.ctx.push(now + self.dep.links.restore_prepare_s, self._drain)

    def _drain(self) -> None:
        self.draining = True
        self.poke(self.ctx.now)

    def _commit_restore(self, now: float) -> None:
        cost, links = self.dep.cost_model, self.dep.links
        index = {m.name: i for i, m in enumerate(self.members)}
        kv_in = [0] * len(self.members)
        for seq in self.sched.running:
            g = self.seqs[seq.request_id]
            o = index[g.owner]
            st = self.stages[o]
            missing = cost.num_layers - (st.end - st.start) - (len(g.pending) if g.kv_stage == o else 0)
            kv_in[o] += seq.num_computed_tokens * cost.kv_bytes_per_token_layer * max(missing, 0)
        pause = max(kv / links.kv_bw + cost.freed_bytes(st.start, st.end) / links.restore_bw
                    for kv, st in zip(kv_in, self.stages, strict=True)) + links.restore_fixed_s
        self.paused = True
        self.ctx.push(now + pause, self._split)

    def _split(self) -> None:
        now = self.ctx.now
        by_name = {m.name: m for m in self.members}
        for m in self.members:
            m.reset_pool()
            m.group = None
        requeue: list[tuple[Instance, Sequence]] = []
        for seq in self.sched.running:
            home = by_name[self.seqs[seq.request_id].owner]
            seq.block_table = []
            if seq.num_computed_tokens > 0 and home.adopt(seq, now):
                continue
            seq.num_computed_tokens = 0  # no room at home: recomputed, as a preemption would
            seq.status = SequenceStatus.WAITING
            seq.num_preemptions += 1
            self.ctx.requests[seq.request_id].requeued(now)
            requeue.append((home, seq))
        requeue += [(by_name[self.seqs[s.request_id].owner], s) for s in self.sched.waiting]
        for home, seq in requeue:
            seq.block_table = []
            home.sched.waiting.append(seq)
        self.sched.running.clear()
        self.sched.waiting.clear()
        self.seqs.clear()
        self.on_split(self, now)
