"""The burst benchmark's policies and the background controllers two of them run.

- `kunserve`: the operator's planner (`controller.decide`: drop at high KV demand with a queue, restore after
  the demand stayed low for a window) and its two-phase `Executor`, fed by the same `PressureCollector` as
  local mode and the operator; no Redis, no gateway (the harness routes).
- `vllm`: the engine as it is — queue + preemption by recompute, no reconfiguration.
- `swap`: the same engine started with `--preemption-mode swap` (KV to host memory; the PCIe time is modelled).
- `llumnix`: every round, requests of the most loaded replica migrate for real (Migration.MigrateOut:
  detach, Peer.PullKV, adopt) to the least loaded one, when one is clearly more loaded than the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import grpc

from kunserve.operator.agent_client import AgentClients
from kunserve.operator.controller import decide
from kunserve.operator.cost_model import CostModel
from kunserve.operator.executor import Executor, ExecutorSettings, OutcomeUnknownError
from kunserve.operator.plan_types import PoolSpec, ReplicaPressure
from kunserve.operator.pressure import PressureCollector
from kunserve.operator.reconfig import FormedGroup, ReconfigRecord, ReconfigSpec, apply_committed
from kunserve.rpc.options import message_limits
from kunserve.rpc.v1 import migration_pb2, migration_pb2_grpc


class Policy(StrEnum):
    KUNSERVE = "kunserve"
    VLLM = "vllm"
    SWAP = "swap"
    LLUMNIX = "llumnix"

    def agent_flags(self, swap_bandwidth: float) -> list[str]:
        if self is Policy.SWAP:
            return ["--preemption-mode", "swap", "--swap-bandwidth", str(int(swap_bandwidth))]
        return []


@dataclass(slots=True)
class ControlEvent:
    kind: str  # drop | restore | migrate | failed
    start_s: float  # seconds since the run started
    end_s: float
    detail: str = ""
    kv_bytes: int = 0


@dataclass(slots=True)
class Placement:
    """Where each open request runs now (the harness routes; migrations move them)."""

    location: dict[str, str] = field(default_factory=dict)  # request id -> agent id
    tokens: dict[str, int] = field(default_factory=dict)  # tokens received so far
    arrival: dict[str, float] = field(default_factory=dict)

    def open_on(self, agent: str) -> list[str]:
        return [r for r, a in self.location.items() if a == agent]


def demand(p: ReplicaPressure) -> float:
    return p.blocks_needed / p.blocks_total if p.blocks_total else 0.0


@dataclass(slots=True)
class Controller:
    policy: Policy
    endpoints: dict[str, str]  # agent id -> host:port
    model_dir: Path
    block_size: int
    planner: PoolSpec
    placement: Placement
    clock: Callable[[], float]  # seconds since the run started
    interval_s: float = 0.5
    migrate_per_round: int = 2
    events: list[ControlEvent] = field(default_factory=list)
    groups: tuple[FormedGroup, ...] = ()
    epoch: int = 0
    low_since: dict[str, float] = field(default_factory=dict)

    async def run(self, stop: asyncio.Event) -> None:
        if self.policy not in (Policy.KUNSERVE, Policy.LLUMNIX):
            return
        clients = AgentClients(60.0)
        try:
            async with PressureCollector(interval_ms=200, stale_after_s=10.0) as collector:
                collector.set_targets(self.endpoints)
                step = self._plan if self.policy is Policy.KUNSERVE else self._balance
                while not stop.is_set():
                    pressures = collector.snapshot()
                    if pressures:
                        await step(pressures, clients)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.interval_s)
        finally:
            await clients.close()

    # ---- kunserve: the planner and the executor -------------------------------------------------------------
    async def _plan(self, pressures: list[ReplicaPressure], clients: AgentClients) -> None:
        cost = CostModel.from_hf_config(json.loads((self.model_dir / "config.json").read_text()), 4,
                                        block_size=self.block_size)
        decision, self.low_since = decide(pressures, self.groups, model=pressures[0].model, spec=self.planner,
                                          cost=cost, now=time.time(), low_since=self.low_since)
        if decision is None:
            return
        self.low_since.pop(decision.group.id, None)
        self.epoch += 1
        spec = decision.spec("bench", self.epoch)

        async def committed(s: ReconfigSpec, record: ReconfigRecord) -> None:
            self.groups = apply_committed(self.groups, s, record.committed_groups, f"bench-{s.epoch}")

        start = self.clock()
        executor = Executor(clients, ExecutorSettings(prepare_timeout_s=60, commit_timeout_s=300))
        members = {m: self.endpoints[m] for m in spec.members}
        record = ReconfigRecord()
        while True:
            try:
                record = await executor.execute(spec, members, record=record, on_committed=committed,
                                                current_epoch=self.epoch - 1, num_layers=cost.num_layers)
                break
            except OutcomeUnknownError:
                await asyncio.sleep(0.5)
        ok = record.phase.value == "Completed"
        kind = spec.action.value.lower() if ok else "failed"
        stages = ", ".join(f"{st.replica}[{st.layer_start},{st.layer_end})" for g in spec.groups for st in g.stages)
        self.events.append(ControlEvent(kind, start, self.clock(), f"{spec.action.value} {stages}: {decision.reason}"
                                        + ("" if ok else f" ({record.message})")))

    # ---- llumnix: migrate from the most to the least loaded replica ---------------------------------------
    async def _balance(self, pressures: list[ReplicaPressure], clients: AgentClients) -> None:
        ranked = sorted(pressures, key=demand)
        dst, src = ranked[0], ranked[-1]
        if src.name == dst.name or not (src.num_waiting > 0 or demand(src) > 1.0) or demand(dst) > 0.8 \
                or dst.num_waiting > 0 or demand(src) - demand(dst) < 0.3:
            return
        open_ = self.placement.open_on(src.name)
        # queued (no token yet), newest first, then running with the fewest tokens: cheapest to move first
        order = sorted(open_, key=lambda r: (self.placement.tokens.get(r, 0) > 0, self.placement.tokens.get(r, 0),
                                             -self.placement.arrival.get(r, 0.0)))
        for rid in order[: self.migrate_per_round]:
            start = self.clock()
            try:
                async with grpc.aio.insecure_channel(self.endpoints[src.name], options=message_limits()) as ch:
                    answer = await migration_pb2_grpc.MigrationStub(ch).MigrateOut(
                        migration_pb2.MigrateOutRequest(request_id=rid, target=self.endpoints[dst.name]), timeout=60)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    return  # the target is full
                continue  # finished meanwhile
            if self.placement.location.get(rid) == src.name:
                self.placement.location[rid] = dst.name
            self.events.append(ControlEvent("migrate", start, self.clock(), f"{rid} {src.name}->{dst.name} "
                                            f"{answer.num_tokens} tokens", int(answer.kv_bytes)))

