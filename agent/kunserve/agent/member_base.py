"""State and helpers shared by an agent's reconfiguration steps (see member.py for the protocol)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import grpc
import torch

from kunserve.agent import channels
from kunserve.agent.engine.migration import MigratedRequest
from kunserve.agent.engine_loop import EngineLoop
from kunserve.agent.errors import KunServeError
from kunserve.agent.group import GroupLeader, GroupLostError
from kunserve.agent.layer_store import LayerStore
from kunserve.agent.stage import NO_STAGE, StageExecutor
from kunserve.agent.transport import GrpcTransport
from kunserve.rpc.v1 import agent_pb2, peer_pb2, peer_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")


class Role(Enum):
    REPLICA = agent_pb2.ROLE_REPLICA
    LEADER = agent_pb2.ROLE_LEADER
    STAGE = agent_pb2.ROLE_STAGE


class ReconfigurationError(KunServeError):
    """A reconfiguration step this agent refuses or could not complete; `code` is the gRPC status to answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True, frozen=True)
class StagePlan:
    agent_id: str
    endpoint: str
    start: int
    end: int


@dataclass(slots=True)
class Prepared:
    epoch: int
    action: int  # agent_pb2.Action
    stages: tuple[StagePlan, ...]
    weights: dict[str, torch.Tensor] | None = None  # restore: the missing weights, read in Prepare


def stages_from_proto(group: agent_pb2.GroupSpec) -> tuple[StagePlan, ...]:
    return tuple(StagePlan(s.agent_id, s.endpoint, s.layer_start, s.layer_end) for s in group.stages)


def stages_to_proto(stages: tuple[StagePlan, ...]) -> agent_pb2.GroupSpec:
    return agent_pb2.GroupSpec(stages=[agent_pb2.StageSpec(agent_id=s.agent_id, endpoint=s.endpoint,
                                                           layer_start=s.start, layer_end=s.end) for s in stages])


def check_stages(stages: tuple[StagePlan, ...], num_layers: int) -> str | None:
    """Why these stages are not a valid group of a num_layers model, or None."""
    if len(stages) < 2:
        return f"a group needs at least 2 stages, got {len(stages)}"
    if len({s.agent_id for s in stages}) != len(stages):
        return "a member appears twice in the group"
    expect = 0
    for s in stages:
        if s.start != expect or s.end <= s.start:
            return f"stage {s.agent_id} holds [{s.start}, {s.end}); stages must be contiguous non-empty ranges from 0"
        expect = s.end
    if expect != num_layers:
        return f"the stages end at layer {expect}, the model has {num_layers}"
    return None



class MemberBase:
    """The agent's group state; the steps live in DropSteps (member_drop.py), RestoreSteps
    (member_restore.py) and Member (member.py: Prepare / Commit / Abort and failures)."""

    def __init__(self, loop: EngineLoop, agent_id: str, endpoint: str, rpc_timeout_s: float = 30.0,
                 stream_timeout_s: float = 24 * 3600.0, depth: int = 2, exchange_bytes: int = 8 << 20,
                 restore_from: str = "checkpoint") -> None:
        """restore_from: where a restore reads the layers this agent dropped: "checkpoint" (the local host
        copy) or "peers" (pulled over the Peer service from the members that hold them)."""
        if restore_from not in ("checkpoint", "peers"):
            raise ValueError(f"restore_from must be checkpoint or peers, got {restore_from!r}")
        self.restore_from = restore_from
        self.loop, self.engine = loop, loop.engine
        self.agent_id, self.endpoint = agent_id, endpoint
        self.rpc_timeout_s, self.stream_timeout_s = rpc_timeout_s, stream_timeout_s
        self.depth, self.exchange_bytes = depth, exchange_bytes
        self.store = LayerStore(self.engine)
        self.role = Role.REPLICA
        self.epoch = 0
        self.stages: tuple[StagePlan, ...] = ()
        self.prepared: Prepared | None = None
        self.leader: GroupLeader | None = None
        self.executor: StageExecutor | None = None
        self.transport: GrpcTransport | None = None
        self.handoff: dict[str, asyncio.Queue[object]] = {}  # leader: outputs of requests other members follow
        self.relays: dict[str, asyncio.Task[None]] = {}  # a stage: requests it follows on the leader
        self.relay_tokens: dict[str, int] = {}  # their tokens so far (prompt + output): its home pressure
        self.collected: list[MigratedRequest] = []
        self.last_commit: agent_pb2.CommitResponse | None = None
        self.applied: tuple[int, int, tuple[StagePlan, ...]] | None = None  # the last (epoch, action, stages) done
        self.last_drop_s: float | None = None
        self.last_restore_s: float | None = None
        self.kv_bytes_in = 0
        self.remote_attention_served = 0
        self._remote_calls_before = 0  # made by executors of earlier groups
        self._lock = asyncio.Lock()
        self._io = ThreadPoolExecutor(2, thread_name_prefix="kv-exchange")
        self._watchdog: asyncio.Task[None] | None = None
        self._commits: dict[int, asyncio.Task[agent_pb2.CommitResponse]] = {}  # the leader's commits, by epoch
        self.aio_loop: asyncio.AbstractEventLoop | None = None
        self.on_change: Callable[[MemberBase], None] | None = None  # metrics hook
        loop.on_group_lost = self._group_lost

    # ---- helpers ---------------------------------------------------------------------------------------
    async def _on_engine(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.loop.call(fn))

    @property
    def stage_index(self) -> int:
        return next((i for i, s in enumerate(self.stages) if s.agent_id == self.agent_id), NO_STAGE)

    def _peer(self, endpoint: str) -> Any:
        return peer_pb2_grpc.PeerStub(channels.aio(endpoint))

    @property
    def remote_attention_calls(self) -> int:
        executor = self.leader.executor if self.leader is not None else self.executor
        return self._remote_calls_before + (executor.remote_calls if executor is not None else 0)

    def home_blocks_needed(self) -> int | None:
        """Blocks (every layer) the requests this agent owns need; None while it serves alone."""
        bs = self.engine.config.block_size
        if self.leader is not None:
            return self.leader.home_blocks_needed(self.agent_id)
        if self.role is Role.STAGE:
            return sum(-(-(n + 1) // bs) for n in list(self.relay_tokens.values()))
        return None

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def _leave_group(self) -> None:
        """Engine thread: serve alone again (the pool and weights are already whole)."""
        if self.transport is not None:
            self.transport.close()
        self._remote_calls_before = self.remote_attention_calls
        self.leader, self.executor, self.transport = None, None, None
        if self._watchdog is not None and self.aio_loop is not None:
            self.aio_loop.call_soon_threadsafe(self._watchdog.cancel)
            self._watchdog = None
        self.role, self.stages = Role.REPLICA, ()
        self.loop.driver = self.engine

    async def _disband_peer(self, endpoint: str, epoch: int, reason: str) -> None:
        await self._peer(endpoint).Disband(peer_pb2.DisbandRequest(epoch=epoch, reason=reason), timeout=10.0)

    async def disband(self, epoch: int, reason: str) -> int:
        """Leave the group whatever its state (Member implements it)."""
        raise NotImplementedError

    def _group_lost(self, exc: GroupLostError) -> None:
        raise NotImplementedError

def _sampling(msg: Any) -> Any:
    from kunserve.agent.service import sampling_from_proto

    return sampling_from_proto(msg)

