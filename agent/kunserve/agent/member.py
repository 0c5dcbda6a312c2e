"""An agent's part in reconfigurations: Prepare / Commit / Abort of a drop or restore, and the group steps
members run for each other (Join, Collect, Split, Disband).

Drop (leader's Commit): the leader pauses, drops its layers, asks every other member to Join (each drops
its layers, grows its pool and hands its requests over with their block tables), then schedules the
whole group (group.GroupLeader). Restore (leader's Commit): the leader drains its micro-batches and
pauses, every member Collects the KV of the requests it owns (all layers, from wherever they are) into
host memory, then every member Splits: loads the weights it prefetched in Prepare, rebuilds a pool for
every layer, takes its requests back and serves alone. Anything that fails before the commit point
leaves every member as it was (Abort); a member lost during the cooperative phase fails the group's
requests with a retryable error and every survivor restores itself from its local checkpoint.

Engine state is touched only on the engine thread (`self._on_engine`); gRPC calls run on the asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TypeVar

import grpc
import torch

from kunserve.agent import channels
from kunserve.agent.engine_loop import GroupFailedError
from kunserve.agent.errors import KunServeError
from kunserve.agent.group import GroupLostError
from kunserve.agent.member_base import (
    Prepared,
    ReconfigurationError,
    Role,
    StagePlan,
    check_stages,
    stages_from_proto,
    stages_to_proto,
)
from kunserve.agent.member_drop import DropSteps
from kunserve.agent.member_restore import RestoreSteps
from kunserve.rpc.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")


__all__ = ["Member", "ReconfigurationError", "Role", "StagePlan", "check_stages", "stages_from_proto",
           "stages_to_proto"]


class Member(DropSteps, RestoreSteps):
    """An agent's part in reconfigurations (see the module docstring)."""

    # ---- Agent.Prepare / Abort -------------------------------------------------------------------------
    async def prepare(self, req: agent_pb2.PrepareRequest) -> agent_pb2.PrepareResponse:
        self.aio_loop = asyncio.get_running_loop()
        stages = stages_from_proto(req.group)
        if req.action not in (agent_pb2.ACTION_DROP, agent_pb2.ACTION_RESTORE):
            raise ReconfigurationError(grpc.StatusCode.INVALID_ARGUMENT, "action must be DROP or RESTORE")
        p = self.prepared
        if p is not None and (p.epoch, p.action, p.stages) == (req.epoch, req.action, stages):
            return self._prepared_response(p)
        if self.applied == (req.epoch, req.action, stages):  # already carried out (a resumed executor asks again)
            return agent_pb2.PrepareResponse(agent_id=self.agent_id, epoch=req.epoch,
                                             kv_blocks_total=self.engine.block_manager.num_blocks)
        fail = grpc.StatusCode.FAILED_PRECONDITION
        async with self._lock:
            if req.epoch <= self.epoch:
                raise ReconfigurationError(fail, f"epoch {req.epoch} is not newer than committed epoch {self.epoch}")
            if p is not None and p.epoch >= req.epoch:
                raise ReconfigurationError(fail, f"epoch {p.epoch} is prepared already; abort it first")
            problem = check_stages(stages, self.engine.model_config.num_hidden_layers)
            if problem is None and all(s.agent_id != self.agent_id for s in stages):
                problem = f"agent {self.agent_id} is not a member of the group"
            if problem is None and req.action == agent_pb2.ACTION_DROP and self.role is not Role.REPLICA:
                problem = f"agent {self.agent_id} is already a stage of a group (epoch {self.epoch})"
            if problem is None and req.action == agent_pb2.ACTION_RESTORE and stages != self.stages:
                problem = "the group to restore is not the group this agent is in"
            if problem is not None:
                raise ReconfigurationError(fail, problem)
            await self._check_peers(stages, req.action)
            weights = None
            if req.action == agent_pb2.ACTION_RESTORE:
                names = await self._on_engine(self.store.missing_weight_names)
                read = self._pull_weights if self.restore_from == "peers" else self.engine.checkpoint.read_weights
                try:
                    weights = await asyncio.to_thread(read, names)
                except (KunServeError, OSError) as exc:
                    raise ReconfigurationError(fail, f"cannot read the weights to restore: {exc}") from exc
            self.prepared = Prepared(req.epoch, req.action, stages, weights)
            log.info("prepared epoch %d: %s %s", req.epoch, agent_pb2.Action.Name(req.action),
                     [(s.agent_id, s.start, s.end) for s in stages])
            return self._prepared_response(self.prepared)

    def _pull_weights(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named weights from the members holding them: a layer from its stage, the embedding from
        stage 0, the final norm and LM head from the last stage."""
        from kunserve.agent.peer import PeerWeightSource

        by_stage: dict[int, list[str]] = {}
        for name in names:
            if name.startswith("layers."):
                layer = int(name.split(".")[1])
                at = next(i for i, s in enumerate(self.stages) if s.start <= layer < s.end)
            else:
                at = 0 if name.startswith("embed_tokens") else len(self.stages) - 1
            by_stage.setdefault(at, []).append(name)
        weights: dict[str, torch.Tensor] = {}
        for at, wanted in by_stage.items():
            source = PeerWeightSource(self.stages[at].endpoint, self.rpc_timeout_s)
            weights.update(source.read_weights(wanted))
        return weights

    def _prepared_response(self, p: Prepared) -> agent_pb2.PrepareResponse:
        if p.weights is not None:
            delta = -sum(t.nbytes for t in p.weights.values())
        else:
            me = next(s for s in p.stages if s.agent_id == self.agent_id)
            layers = self.engine.model_config.num_hidden_layers
            delta = self.engine.weight_bytes * (layers - (me.end - me.start)) // layers
        return agent_pb2.PrepareResponse(agent_id=self.agent_id, epoch=p.epoch,
                                         kv_blocks_total=self.engine.block_manager.num_blocks, weight_bytes_delta=delta)

    async def _check_peers(self, stages: tuple[StagePlan, ...], action: int) -> None:
        async def status(s: StagePlan) -> None:
            try:
                st = await agent_pb2_grpc.AgentStub(channels.aio(s.endpoint)).Status(agent_pb2.StatusRequest(),
                                                                                    timeout=5.0)
            except grpc.aio.AioRpcError as exc:
                raise ReconfigurationError(grpc.StatusCode.FAILED_PRECONDITION,
                                           f"member {s.agent_id} at {s.endpoint} does not answer: "
                                           f"{exc.code().name}") from exc
            if st.agent_id != s.agent_id or st.num_layers != self.engine.model_config.num_hidden_layers:
                raise ReconfigurationError(grpc.StatusCode.FAILED_PRECONDITION,
                                           f"{s.endpoint} is agent {st.agent_id!r} with {st.num_layers} layers, "
                                           f"expected {s.agent_id!r} with the same model")
            if action == agent_pb2.ACTION_DROP and st.role != agent_pb2.ROLE_REPLICA:
                raise ReconfigurationError(grpc.StatusCode.FAILED_PRECONDITION,
                                           f"member {s.agent_id} is not serving as a replica")

        await asyncio.gather(*(status(s) for s in stages if s.agent_id != self.agent_id))

    def abort(self, epoch: int) -> bool:
        if self.prepared is not None and self.prepared.epoch == epoch:
            self.prepared = None
            log.info("aborted prepared epoch %d", epoch)
            return True
        return False

    # ---- Agent.Commit (the leader) ---------------------------------------------------------------------
    async def commit(self, epoch: int) -> agent_pb2.CommitResponse:
        """Carry out the prepared reconfiguration. It runs as a task of its own: a caller that goes away (a
        controller that dies mid-commit) does not cancel it half-way, and a Commit of the same epoch sent
        again waits for that same task (or gets its recorded result)."""
        if self.last_commit is not None and self.last_commit.epoch == epoch:
            return self.last_commit
        task = self._commits.get(epoch)
        if task is None:
            p = self.prepared
            fail = grpc.StatusCode.FAILED_PRECONDITION
            if p is None or p.epoch != epoch:
                raise ReconfigurationError(fail, f"epoch {epoch} is not prepared here")
            if p.stages[0].agent_id != self.agent_id:
                raise ReconfigurationError(fail, f"commit goes to the group's leader {p.stages[0].agent_id}")
            task = self._commits[epoch] = asyncio.get_running_loop().create_task(self._commit(p))
        return await asyncio.shield(task)

    async def _commit(self, p: Prepared) -> agent_pb2.CommitResponse:
        epoch = p.epoch
        async with self._lock:
            t0 = time.perf_counter()
            if p.action == agent_pb2.ACTION_DROP:
                members = await self._commit_drop(p)
            else:
                members = await self._commit_restore(p)
            self.prepared = None
            self.applied = (epoch, p.action, p.stages)
            self.last_commit = agent_pb2.CommitResponse(epoch=epoch, members=members,
                                                        seconds=time.perf_counter() - t0)
            self._changed()
            return self.last_commit

    # ---- failure ---------------------------------------------------------------------------------------
    async def disband(self, epoch: int, reason: str) -> int:
        """Leave the group whatever its state: fail what this agent follows, restore every layer locally."""
        if self.role is Role.REPLICA or epoch != self.epoch:
            return 0
        log.warning("disbanding group epoch %d: %s", epoch, reason)
        for task in list(self.relays.values()):
            task.cancel()
        self.relays.clear()
        names = await self._on_engine(self.store.missing_weight_names)
        weights = await asyncio.to_thread(self.engine.checkpoint.read_weights, names)

        def heal() -> int:
            failed = self.loop.fail_tracked(GroupFailedError(f"the group of epoch {epoch} is gone: {reason}"))
            if names:
                self.store.install(weights)
            self.engine.reset_pool(self.engine.initial_num_blocks)
            self._leave_group()
            return failed

        failed = await self._on_engine(heal)
        self._changed()
        return failed

    def _group_lost(self, exc: GroupLostError) -> None:
        """Engine thread (the leader's step failed): tell the other members, then restore this agent."""
        aio = self.aio_loop
        if aio is None:
            return
        epoch, others = self.epoch, [s.endpoint for s in self.stages[1:]]

        async def heal() -> None:
            await asyncio.gather(*(self._disband_peer(ep, epoch, str(exc)) for ep in others), return_exceptions=True)
            await self.disband(epoch, str(exc))

        asyncio.run_coroutine_threadsafe(heal(), aio)


