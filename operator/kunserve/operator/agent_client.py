"""The operator's client of the agents' `Agent` service (the only operator module that imports the stubs).

`AgentClients` keeps one grpc.aio channel per endpoint and turns each RPC into plain values: `AgentStatus`,
`PressureSample`, `PrepareOutcome`, `CommitOutcome`. Every call has a deadline; every failure is an
`AgentCallError` carrying the gRPC status code's name, the agent and the method, so callers decide on
codes without importing grpc.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import grpc

from kunserve.operator.plan_types import StagePlan
from kunserve.operator.reconfig import Action, MemberOutcome
from kunserve.rpc.options import control_channel_options
from kunserve.rpc.tls import TlsFiles, add_tls_arguments, aio_channel
from kunserve.rpc.v1 import agent_pb2, agent_pb2_grpc

DEFAULT_TIMEOUT_S = 10.0



class AgentRole(StrEnum):
    UNSPECIFIED = "unspecified"  # an agent that predates roles
    REPLICA = "replica"
    LEADER = "leader"
    STAGE = "stage"

    @property
    def grouped(self) -> bool:
        return self in (AgentRole.LEADER, AgentRole.STAGE)


_ROLES = {agent_pb2.ROLE_UNSPECIFIED: AgentRole.UNSPECIFIED, agent_pb2.ROLE_REPLICA: AgentRole.REPLICA,
          agent_pb2.ROLE_LEADER: AgentRole.LEADER, agent_pb2.ROLE_STAGE: AgentRole.STAGE}
_ACTIONS = {Action.DROP: agent_pb2.ACTION_DROP, Action.RESTORE: agent_pb2.ACTION_RESTORE}


class AgentCallError(Exception):
    """An Agent RPC failed. code: the gRPC status code's name (e.g. "FAILED_PRECONDITION")."""

    def __init__(self, endpoint: str, method: str, code: str, details: str) -> None:
        super().__init__(f"{method} on {endpoint}: {code}: {details}")
        self.endpoint = endpoint
        self.method = method
        self.code = code
        self.details = details

    @property
    def unimplemented(self) -> bool:
        return self.code == "UNIMPLEMENTED"

    @property
    def definite(self) -> bool:
        """The agent answered and refused: the call did nothing (as opposed to a lost answer)."""
        return self.code in ("FAILED_PRECONDITION", "INVALID_ARGUMENT", "ABORTED", "UNIMPLEMENTED", "NOT_FOUND",
                             "ALREADY_EXISTS", "OUT_OF_RANGE", "PERMISSION_DENIED", "UNAUTHENTICATED")


@dataclass(slots=True, frozen=True)
class StageSpec:
    """One stage of a group as the wire names it (agent id, its endpoint, its layer range)."""

    agent_id: str
    endpoint: str
    layer_start: int
    layer_end: int


@dataclass(slots=True, frozen=True)
class AgentStatus:
    agent_id: str
    model: str
    num_layers: int
    layer_start: int
    layer_end: int
    block_size: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_block_bytes: int
    weight_bytes: int
    memory_budget_bytes: int
    epoch: int
    role: AgentRole
    device: str
    group: tuple[StageSpec, ...]
    prepared_epoch: int

    @property
    def group_members(self) -> tuple[str, ...]:
        return tuple(s.agent_id for s in self.group)


@dataclass(slots=True, frozen=True)
class PressureSample:
    agent_id: str
    blocks_needed: int
    blocks_total: int
    blocks_free: int
    num_waiting: int
    num_running: int
    demand: float
    timestamp: float
    epoch: int
    num_preemptions: int
    role: AgentRole
    home_blocks_needed: int


@dataclass(slots=True, frozen=True)
class PrepareOutcome:
    agent_id: str
    epoch: int
    kv_blocks_total: int
    weight_bytes_delta: int


@dataclass(slots=True, frozen=True)
class CommitOutcome:
    epoch: int
    members: tuple[MemberOutcome, ...]
    seconds: float


def stages_to_proto(stages: Sequence[StageSpec]) -> agent_pb2.GroupSpec:
    return agent_pb2.GroupSpec(stages=[
        agent_pb2.StageSpec(agent_id=s.agent_id, endpoint=s.endpoint, layer_start=s.layer_start,
                            layer_end=s.layer_end) for s in stages])


def status_from_proto(msg: agent_pb2.StatusResponse) -> AgentStatus:
    return AgentStatus(
        agent_id=msg.agent_id, model=msg.model, num_layers=msg.num_layers, layer_start=msg.layer_start,
        layer_end=msg.layer_end, block_size=msg.block_size, kv_blocks_total=msg.kv_blocks_total,
        kv_blocks_free=msg.kv_blocks_free, kv_block_bytes=msg.kv_block_bytes, weight_bytes=msg.weight_bytes,
        memory_budget_bytes=msg.memory_budget_bytes, epoch=msg.epoch, role=_ROLES.get(msg.role, AgentRole.UNSPECIFIED),
        device=msg.device, prepared_epoch=msg.prepared_epoch,
        group=tuple(StageSpec(s.agent_id, s.endpoint, s.layer_start, s.layer_end) for s in msg.group.stages))


def pressure_from_proto(msg: agent_pb2.Pressure) -> PressureSample:
    return PressureSample(
        agent_id=msg.agent_id, blocks_needed=msg.blocks_needed, blocks_total=msg.blocks_total,
        blocks_free=msg.blocks_free, num_waiting=msg.num_waiting, num_running=msg.num_running, demand=msg.demand,
        timestamp=msg.timestamp, epoch=msg.epoch, num_preemptions=msg.num_preemptions,
        role=_ROLES.get(msg.role, AgentRole.UNSPECIFIED), home_blocks_needed=msg.home_blocks_needed)


def stage_specs(stages: Sequence[StagePlan], endpoints: Mapping[str, str]) -> tuple[StageSpec, ...]:
    """Wire stages from plan stages and a replica -> endpoint map (KeyError names a replica without one)."""
    return tuple(StageSpec(s.replica, endpoints[s.replica], s.layer_start, s.layer_end) for s in stages)


_tls: TlsFiles | None = None


def configure_tls(files: TlsFiles | None) -> None:
    """TLS files of every channel to agents opened from now on (None: plaintext)."""
    global _tls
    _tls = files


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    """The --tls-* flags of the operator's calls to the agents."""
    add_tls_arguments(parser)


def configure_tls_from_args(args: argparse.Namespace) -> None:
    """Check the files the --tls-* flags name and use them for every channel to agents; raises TlsError
    (a ValueError naming the file and flag)."""
    files = TlsFiles.from_args(args)
    if files is not None:
        files.read()
    configure_tls(files)


class AgentClients:
    """Channels to agents, one per endpoint, and the Agent RPCs over them (use inside one event loop)."""

    def __init__(self, default_timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.default_timeout_s = default_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, endpoint: str) -> agent_pb2_grpc.AgentStub:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = aio_channel(endpoint, _tls, control_channel_options())
            self._channels[endpoint] = channel
        return agent_pb2_grpc.AgentStub(channel)

    def _timeout(self, timeout_s: float | None) -> float:
        return self.default_timeout_s if timeout_s is None else timeout_s

    async def status(self, endpoint: str, timeout_s: float | None = None) -> AgentStatus:
        try:
            msg = await self._stub(endpoint).Status(agent_pb2.StatusRequest(), timeout=self._timeout(timeout_s))
        except grpc.aio.AioRpcError as exc:
            raise _error(endpoint, "Status", exc) from exc
        return status_from_proto(msg)

    async def watch_pressure(self, endpoint: str, interval_ms: int, timeout_s: float) -> AsyncIterator[PressureSample]:
        """The agent's pressure stream until it ends, fails (AgentCallError) or reaches its deadline
        (AgentCallError DEADLINE_EXCEEDED: re-open it)."""
        call = self._stub(endpoint).WatchPressure(agent_pb2.WatchPressureRequest(interval_ms=interval_ms),
                                                  timeout=timeout_s)
        try:
            async for msg in call:
                yield pressure_from_proto(msg)
        except grpc.aio.AioRpcError as exc:
            raise _error(endpoint, "WatchPressure", exc) from exc
        finally:
            call.cancel()

    async def prepare(self, endpoint: str, epoch: int, action: Action, stages: Sequence[StageSpec], reason: str,
                      timeout_s: float | None = None) -> PrepareOutcome:
        request = agent_pb2.PrepareRequest(epoch=epoch, action=_ACTIONS[action], group=stages_to_proto(stages),
                                           reason=reason[:1024])
        try:
            msg = await self._stub(endpoint).Prepare(request, timeout=self._timeout(timeout_s))
        except grpc.aio.AioRpcError as exc:
            raise _error(endpoint, "Prepare", exc) from exc
        return PrepareOutcome(msg.agent_id, msg.epoch, msg.kv_blocks_total, msg.weight_bytes_delta)

    async def commit(self, endpoint: str, epoch: int, timeout_s: float | None = None) -> CommitOutcome:
        try:
            msg = await self._stub(endpoint).Commit(agent_pb2.CommitRequest(epoch=epoch),
                                                    timeout=self._timeout(timeout_s))
        except grpc.aio.AioRpcError as exc:
            raise _error(endpoint, "Commit", exc) from exc
        return CommitOutcome(epoch=msg.epoch, seconds=msg.seconds, members=tuple(
            MemberOutcome(m.agent_id, m.layer_start, m.layer_end, m.kv_blocks_total, m.seconds, m.requests_moved)
            for m in msg.members))

    async def abort(self, endpoint: str, epoch: int, reason: str, timeout_s: float | None = None) -> bool:
        """True when the agent had that epoch prepared."""
        try:
            msg = await self._stub(endpoint).Abort(
                agent_pb2.AbortReconfigurationRequest(epoch=epoch, reason=reason[:1024]),
                timeout=self._timeout(timeout_s))
        except grpc.aio.AioRpcError as exc:
            raise _error(endpoint, "Abort", exc) from exc
        return bool(msg.was_prepared)

    async def forget(self, endpoint: str) -> None:
        """Close the channel to an endpoint no longer used."""
        channel = self._channels.pop(endpoint, None)
        if channel is not None:
            await channel.close(grace=None)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close(grace=None) for c in channels), return_exceptions=True)


def _error(endpoint: str, method: str, exc: grpc.aio.AioRpcError) -> AgentCallError:
    code = exc.code()
    return AgentCallError(endpoint, method, code.name if code is not None else "UNKNOWN", exc.details() or "")
