"""The agents the gateway can route to: one gRPC channel per endpoint (shared by Generate calls and the
pressure stream, whose steady traffic also keeps HTTP/2 keepalive pings welcome), and a background
follower of each agent's Agent.WatchPressure stream that reconnects with backoff.

A replica is DOWN when its pressure stream or a Generate call on it failed and no pressure message came
since; STALE when its last message is older than `stale_after_s`; UNKNOWN before its first message.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from enum import Enum

import grpc

from kunserve.gateway.topology import ReplicaSpec, Topology
from kunserve.rpc.options import control_channel_options
from kunserve.rpc.tls import TlsFiles, aio_channel
from kunserve.rpc.v1 import agent_pb2, agent_pb2_grpc, inference_pb2_grpc

log = logging.getLogger(__name__)
WATCH_ROTATE_S = 300.0  # the pressure stream's deadline; it is re-opened when it expires
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0



class Health(Enum):
    UNKNOWN = "unknown"
    UP = "up"
    STALE = "stale"
    DOWN = "down"


@dataclass(slots=True)
class PressureSample:
    blocks_needed: int
    blocks_total: int
    blocks_free: int
    num_waiting: int
    num_running: int
    demand: float
    epoch: int
    received_at: float  # time.monotonic() at the gateway


@dataclass(slots=True, eq=False)
class ReplicaState:
    spec: ReplicaSpec
    channel: grpc.aio.Channel
    sample: PressureSample | None = None
    down: bool = False
    last_error: str = ""
    inflight: int = 0  # this gateway's open streams on it
    sent_since_sample: int = 0  # open requests sent after the last pressure message (not reflected in it)
    sent_blocks_since_sample: int = 0  # their estimated KV blocks
    sample_seq: int = 0  # counts pressure messages, so a request knows whether the last one saw it
    block_size: int = 16
    agent_id: str = ""
    follower: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def inference(self) -> inference_pb2_grpc.InferenceStub:
        return inference_pb2_grpc.InferenceStub(self.channel)

    def health(self, stale_after_s: float, now: float | None = None) -> Health:
        if self.down:
            return Health.DOWN
        if self.sample is None:
            return Health.UNKNOWN
        now = time.monotonic() if now is None else now
        return Health.STALE if now - self.sample.received_at > stale_after_s else Health.UP

    def on_pressure(self, msg: agent_pb2.Pressure) -> None:
        self.sample = PressureSample(
            blocks_needed=msg.blocks_needed, blocks_total=msg.blocks_total, blocks_free=msg.blocks_free,
            num_waiting=msg.num_waiting, num_running=msg.num_running, demand=msg.demand, epoch=msg.epoch,
            received_at=time.monotonic())
        self.sent_since_sample = self.sent_blocks_since_sample = 0
        self.sample_seq += 1
        if self.down:
            log.info("replica %s is up again", self.spec.id)
        self.down = False

    def mark_down(self, reason: str) -> None:
        if not self.down:
            log.warning("replica %s (%s) is down: %s", self.spec.id, self.spec.endpoint, reason)
        self.down, self.last_error = True, reason


class ReplicaRegistry:
    """Replica states for the current topology, reconciled on every topology change."""

    def __init__(self, pressure_interval_ms: int = 200, connect_timeout_s: float = 5.0,
                 tls: TlsFiles | None = None) -> None:
        self.tls = tls
        self.pressure_interval_ms = pressure_interval_ms
        self.connect_timeout_s = connect_timeout_s
        self.topology = Topology()
        self.replicas: dict[str, ReplicaState] = {}
        self._retired: list[ReplicaState] = []  # removed, waiting for their streams to finish
        self._closing: set[asyncio.Task[None]] = set()

    def apply(self, topology: Topology) -> None:
        """Start following new replicas, stop following removed ones (their open streams finish)."""
        self.topology = topology
        wanted = {r.id: r for r in topology.replicas}
        for rid, state in list(self.replicas.items()):
            if rid not in wanted or wanted[rid].endpoint != state.spec.endpoint:
                self._retire(self.replicas.pop(rid))
        for rid, spec in wanted.items():
            if rid in self.replicas:
                self.replicas[rid].spec = spec
            else:
                channel = aio_channel(spec.endpoint, self.tls, control_channel_options())
                state = ReplicaState(spec, channel)
                state.follower = asyncio.create_task(self._follow(state), name=f"pressure-{rid}")
                self.replicas[rid] = state
        self._close_drained()

    def routable(self) -> list[ReplicaState]:
        ids = [r.id for r in self.topology.routable()]
        return [self.replicas[i] for i in ids if i in self.replicas]

    async def close(self) -> None:
        for state in list(self.replicas.values()):
            self._retire(state)
        self.replicas.clear()
        for state in self._retired:
            await state.channel.close(grace=None)
        self._retired.clear()

    def _retire(self, state: ReplicaState) -> None:
        if state.follower is not None:
            state.follower.cancel()
        self._retired.append(state)

    def _close_drained(self) -> None:
        for state in [s for s in self._retired if s.inflight == 0]:
            self._retired.remove(state)
            task = asyncio.create_task(state.channel.close(grace=None))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _follow(self, state: ReplicaState) -> None:
        """Follow WatchPressure for as long as the replica is in the topology."""
        stub = agent_pb2_grpc.AgentStub(state.channel)
        backoff = BACKOFF_INITIAL_S
        while True:
            received = False
            try:
                status = await stub.Status(agent_pb2.StatusRequest(), timeout=self.connect_timeout_s)
                state.block_size = status.block_size or state.block_size
                state.agent_id = status.agent_id
                call = stub.WatchPressure(agent_pb2.WatchPressureRequest(interval_ms=self.pressure_interval_ms),
                                          timeout=WATCH_ROTATE_S)
                async for msg in call:
                    state.on_pressure(msg)
                    received, backoff = True, BACKOFF_INITIAL_S
                state.mark_down("pressure stream ended")
            except grpc.aio.AioRpcError as exc:
                if received and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # the stream's deadline: re-open it at once
                state.mark_down(f"{exc.code().name}: {exc.details()}")
            await asyncio.sleep(backoff * (1 + random.random() / 2))
            backoff = min(backoff * 2, BACKOFF_MAX_S)
