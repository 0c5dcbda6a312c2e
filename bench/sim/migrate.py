"""Llumnix-like live migration: the KV of a running request moves to the least-loaded instance at network
bandwidth while the request keeps decoding on its source; it switches over once the copy is done.

Load is Llumnix's "freeness": (free blocks - blocks the queue needs) / running requests. Every tick, an
instance whose queue needs more than it has free sends its shortest running request (cheapest to copy) to
the instance with the most freeness left, if that one has room for it beyond its own queue; one outgoing
migration per source at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.sim.instance import Instance
from bench.sim.state import Context
from kunserve.agent.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class Migration:
    seq: Sequence
    src: Instance
    dst: Instance
    blocks: int  # reserved on dst
    nbytes: int


def waiting_blocks(inst: Instance) -> int:
    bm = inst.bm
    return sum(bm.blocks_for(s.num_tokens + 1) for s in inst.sched.waiting)


class Migrator:
    def __init__(self, ctx: Context, instances: list[Instance]) -> None:
        self.ctx, self.instances = ctx, instances
        self.reserved = [0] * len(instances)
        self.outgoing: set[int] = set()
        self.moving: set[str] = set()
        self.migrations = 0
        self.bytes = 0

    def _room(self, inst: Instance, queued: int) -> int:
        return inst.bm.num_free_blocks - self.reserved[inst.index] - queued

    def tick(self, now: float) -> None:
        solo = [i for i in self.instances if i.solo and i.pending_group is None]
        queued = {i.index: waiting_blocks(i) for i in solo}
        freeness = {i.index: self._room(i, queued[i.index]) / max(1, len(i.sched.running)) for i in solo}
        sources = sorted((i for i in solo if i.sched.waiting and self._room(i, queued[i.index]) < 0),
                         key=lambda i: (freeness[i.index], i.index))
        for src in sources:
            if src.index in self.outgoing:
                continue
            dests = sorted((d for d in solo if d is not src and freeness[d.index] > 0),
                           key=lambda d: (-freeness[d.index], d.index))
            if not dests:
                return
            dst = dests[0]
            movable = [s for s in src.sched.running if s.request_id not in self.moving and s.num_computed_tokens > 0]
            if not movable:
                continue
            seq = min(movable, key=lambda s: (s.num_tokens, s.request_id))
            need = dst.bm.blocks_for(seq.num_tokens + dst.bm.block_size)  # room to keep decoding while copying
            if self._room(dst, queued[dst.index]) < need:
                continue
            nbytes = seq.num_computed_tokens * src.dep.cost_model.kv_bytes_per_token()
            mig = Migration(seq, src, dst, need, nbytes)
            self.reserved[dst.index] += need
            self.outgoing.add(src.index)
            self.moving.add(seq.request_id)
            links = src.dep.links
            self.ctx.push(now + links.hop_latency_s + nbytes / links.kv_bw, self._copied, mig)
            freeness[dst.index] = (self._room(dst, queued[dst.index])) / max(1, len(dst.sched.running) + 1)

    def _copied(self, mig: Migration) -> None:
        if mig.seq.busy:  # in the source's current step: switch over when it ends
            mig.src.on_idle.append(lambda now: self._switch(mig, now))
        else:
            self._switch(mig, self.ctx.now)

    def _switch(self, mig: Migration, now: float) -> None:
        seq, src, dst = mig.seq, mig.src, mig.dst
        self.reserved[dst.index] -= mig.blocks
        self.outgoing.discard(src.index)
        self.moving.discard(seq.request_id)
        if seq.status is not SequenceStatus.RUNNING or not src.solo or not dst.solo or seq not in src.sched.running:
            return  # finished or preempted meanwhile: nothing to switch
        old = seq.block_table
        table: list[int] = []
        if not dst.bm.allocate_slots(table, seq.num_computed_tokens):
            return
        src.sched.running.remove(seq)
        src.bm.free(old)
        seq.block_table = table
        dst.sched.running.append(seq)
        req = self.ctx.requests[seq.request_id]
        req.migrations += 1
        src.routed -= 1
        dst.routed += 1
        req.home = dst.index
        self.migrations += 1
        self.bytes += mig.nbytes
        dst.kick(now)
        src.kick(now)
