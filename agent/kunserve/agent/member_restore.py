"""Restore steps: the leader's commit of a restore (drain, Collect on every member, Split on every member)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TypeVar

import grpc
import torch

from kunserve.agent.engine.migration import MigratedRequest, adopt_request, read_kv_blocks
from kunserve.agent.engine_loop import HANDED_BACK
from kunserve.agent.group import GroupLeader
from kunserve.agent.member_base import MemberBase, Prepared, ReconfigurationError, Role, _sampling
from kunserve.agent.transport import pull_kv_blocks, sampling_to_proto
from kunserve.rpc.v1 import agent_pb2, peer_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")


class RestoreSteps(MemberBase):
    # ---- restore ---------------------------------------------------------------------------------------
    async def _commit_restore(self, p: Prepared) -> list[agent_pb2.MemberResult]:
        leader = self.leader
        assert leader is not None and self.role is Role.LEADER
        t0 = time.perf_counter()
        await self._on_engine(lambda: setattr(leader, "draining", True))
        deadline = time.monotonic() + self.rpc_timeout_s
        while not await self._on_engine(lambda: leader.idle):
            if time.monotonic() > deadline:
                await self._on_engine(lambda: setattr(leader, "draining", False))
                raise ReconfigurationError(grpc.StatusCode.ABORTED, "the group did not drain its micro-batches")
            await asyncio.sleep(0.002)
        plan = await self._on_engine(self._restore_plan)
        t1 = time.perf_counter()
        try:
            await asyncio.gather(
                self.collect(p.epoch, plan.get(self.agent_id, [])),
                *(self._peer(s.endpoint).Collect(peer_pb2.CollectRequest(epoch=p.epoch, seqs=plan.get(s.agent_id, [])),
                                                 timeout=self.rpc_timeout_s) for s in p.stages[1:]))
        except Exception as exc:
            self.collected = []
            await self._on_engine(lambda: self._resume_group(leader))
            raise ReconfigurationError(grpc.StatusCode.ABORTED, f"restore of epoch {p.epoch} aborted: {exc}") from exc
        t2 = time.perf_counter()
        results = await asyncio.gather(
            self.split(p.epoch), *(self._peer(s.endpoint).Split(peer_pb2.SplitRequest(epoch=p.epoch),
                                                                timeout=self.rpc_timeout_s) for s in p.stages[1:]))
        log.info("restore of epoch %d: drain %.0f ms, collect %.0f ms, split %.0f ms", p.epoch, (t1 - t0) * 1e3,
                 (t2 - t1) * 1e3, (time.perf_counter() - t2) * 1e3)
        return [results[0], *(r.result for r in results[1:])]

    def _resume_group(self, leader: GroupLeader) -> None:
        leader.draining = False
        self.loop.driver = leader

    def _restore_plan(self) -> dict[str, list[peer_pb2.CollectSeq]]:
        """Engine thread: pause, and list every request by owner with where each layer's KV is."""
        leader = self.leader
        assert leader is not None
        self.loop.driver = None
        now = time.monotonic()
        plan: dict[str, list[peer_pb2.CollectSeq]] = {}
        members = {s.agent_id for s in self.stages}
        for rid, state in self.engine._requests.items():
            seq, g = state.seq, leader.seqs[rid]
            n = seq.num_computed_tokens
            where: dict[int, list[int]] = {}
            for st in leader.stages:
                for layer in range(st.start, st.end):
                    at = g.kv_stage if layer in g.pending else st.index
                    where.setdefault(at, []).append(layer)
            locations = [peer_pb2.KVLocation(endpoint=self.stages[at].endpoint, layers=layers,
                                             block_table=g.tables[at]) for at, layers in where.items()] if n else []
            owner = g.owner if g.owner in members else self.agent_id
            handed = peer_pb2.HandedRequest(
                request_id=rid, prompt_token_ids=seq.prompt_token_ids, output_token_ids=seq.output_token_ids,
                sampling=sampling_to_proto(seq.params), num_computed_tokens=n, owner=owner,
                age_s=now - seq.arrival_time)
            plan.setdefault(owner, []).append(peer_pb2.CollectSeq(request=handed, locations=locations))
        return plan

    async def collect(self, epoch: int, seqs: list[peer_pb2.CollectSeq]) -> int:
        """Restore step one on any member: copy the owned requests' KV (every layer) into host memory."""
        self._check_restore(epoch)

        def gather_all() -> tuple[list[MigratedRequest], int]:
            out, total = [], 0
            now = time.monotonic()
            for cs in seqs:
                h = cs.request
                kv: dict[int, torch.Tensor] = {}
                for loc in cs.locations:
                    table, layers = list(loc.block_table), list(loc.layers)
                    if loc.endpoint == self.endpoint:
                        got = read_kv_blocks(self.engine.kv_cache, table, h.num_computed_tokens, layers)
                        kv.update({k: v.cpu() for k, v in got.items()})
                    else:
                        kv.update(pull_kv_blocks(loc.endpoint, h.request_id, table, h.num_computed_tokens, layers,
                                                 self.rpc_timeout_s))
                total += sum(t.nbytes for t in kv.values())
                out.append(MigratedRequest(h.request_id, list(h.prompt_token_ids), list(h.output_token_ids),
                                           _sampling(h.sampling), h.num_computed_tokens, kv, now - h.age_s))
            return out, total

        self.collected, total = await asyncio.to_thread(gather_all)
        self.kv_bytes_in += total
        return total

    async def split(self, epoch: int) -> agent_pb2.MemberResult:
        """Restore step two on any member: weights back, a pool for every layer, own requests back."""
        self._check_restore(epoch)
        assert self.prepared is not None and self.prepared.weights is not None
        weights = self.prepared.weights
        p = self.prepared
        result = await self._on_engine(lambda: self._split_here(weights))
        self.applied = (epoch, p.action, p.stages) if p is not None else None
        self.prepared, self.epoch = None, epoch
        self._changed()
        return result

    def _check_restore(self, epoch: int) -> None:
        p = self.prepared
        if self.role is Role.REPLICA or p is None or p.epoch != epoch or p.action != agent_pb2.ACTION_RESTORE:
            raise ReconfigurationError(grpc.StatusCode.FAILED_PRECONDITION, f"no restore of epoch {epoch} is prepared")

    def _split_here(self, weights: dict[str, torch.Tensor]) -> agent_pb2.MemberResult:
        t0 = time.perf_counter()
        e = self.engine
        self.loop.driver = None
        if self.leader is not None:
            for rid, g in list(self.leader.seqs.items()):
                if g.owner != self.agent_id:
                    sink = self.loop.untrack(rid)
                    if sink is not None:
                        sink(HANDED_BACK)
        self.store.install(weights)
        t1 = time.perf_counter()
        e.reset_pool(e.initial_num_blocks)
        t2 = time.perf_counter()
        for moved in self.collected:
            adopt_request(e, moved)
        log.info("split: weights %.0f ms, pool %.0f ms, %d requests back %.0f ms", (t1 - t0) * 1e3,
                 (t2 - t1) * 1e3, len(self.collected), (time.perf_counter() - t2) * 1e3)
        moved_n, self.collected = len(self.collected), []
        self._leave_group()
        self.last_restore_s = time.perf_counter() - t0
        return agent_pb2.MemberResult(agent_id=self.agent_id, layer_start=0, layer_end=e.model.end,
                                      kv_blocks_total=e.block_manager.num_blocks, seconds=self.last_restore_s,
                                      requests_moved=moved_n)

