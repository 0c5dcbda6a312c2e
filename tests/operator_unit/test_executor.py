"""The reconfiguration executor against in-process fake agents: the two-phase protocol, failures, and resuming
from every recorded state without repeating or losing a reconfiguration."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from kunserve.operator.agent_client import AgentClients, stage_specs
from kunserve.operator.executor import (
    Executor,
    ExecutorSettings,
    ManualReconfigurationError,
    MemoryRecordStore,
    OutcomeUnknownError,
    drop_group,
    restore_group,
)
from kunserve.operator.plan_types import StagePlan
from kunserve.operator.reconfig import Action, GroupChange, ReconfigPhase, ReconfigRecord, ReconfigSpec
from kunserve.rpc.v1 import agent_pb2
from tests.operator_unit.fake_agent import FakeAgent, FakeCluster

FAST = ExecutorSettings(prepare_timeout_s=2, commit_timeout_s=2, abort_timeout_s=2, status_timeout_s=2,
                        outcome_checks=3, outcome_check_interval_s=0.05)
P = ReconfigPhase


@dataclass
class Env:
    agents: list[FakeAgent]
    clients: AgentClients
    executor: Executor
    published: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)

    @property
    def endpoints(self) -> dict[str, str]:
        return {a.agent_id: a.endpoint for a in self.agents}

    async def on_committed(self, spec: ReconfigSpec, record: ReconfigRecord) -> None:
        self.published.append((spec.epoch, record.committed_groups))


@asynccontextmanager
async def env(n: int = 2, settings: ExecutorSettings = FAST) -> AsyncIterator[Env]:
    cluster = FakeCluster()
    agents = [cluster.add(f"agent-{i}") for i in range(n)]
    await cluster.start_all(*agents)
    clients = AgentClients(default_timeout_s=2)
    try:
        yield Env(agents, clients, Executor(clients, settings))
    finally:
        await clients.close()
        await cluster.stop_all()


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(scenario(), 30))


def drop_spec(epoch: int = 1, members: tuple[str, ...] = ("agent-0", "agent-1"),
              ranges: tuple[tuple[int, int], ...] = ((0, 2), (2, 4)), gid: str = "g1") -> ReconfigSpec:
    stages = tuple(StagePlan(m, a, b) for m, (a, b) in zip(members, ranges, strict=True))
    return ReconfigSpec(pool="p", epoch=epoch, action=Action.DROP, groups=(GroupChange(gid, members, stages),),
                        reason="test")


def restore_spec(epoch: int, drop: ReconfigSpec) -> ReconfigSpec:
    return ReconfigSpec(pool="p", epoch=epoch, action=Action.RESTORE, groups=drop.groups, reason="test")


def layout(agents: list[FakeAgent]) -> list[tuple[int, int, int, int]]:
    return [(a.layer_start, a.layer_end, a.role, a.epoch) for a in agents]


def test_drop_then_restore_through_prepare_and_commit() -> None:
    async def scenario() -> None:
        async with env() as e:
            store = MemoryRecordStore()
            drop = drop_spec(epoch=3)
            record = await e.executor.execute(drop, e.endpoints, store=store, on_committed=e.on_committed,
                                              current_epoch=2, num_layers=4)
            assert record.phase is P.COMPLETED and store.phases == [P.PREPARING, P.PREPARING, P.COMMITTED, P.COMPLETED]
            assert record.committed_groups == ("g1",) and record.attempts == 1
            assert [(m.agent_id, m.layer_start, m.layer_end) for m in record.members] == [
                ("agent-0", 0, 2), ("agent-1", 2, 4)]
            assert record.started_at <= record.prepared_at <= record.committed_at <= record.completed_at  # type: ignore
            assert layout(e.agents) == [(0, 2, agent_pb2.ROLE_LEADER, 3), (2, 4, agent_pb2.ROLE_STAGE, 3)]
            assert e.agents[0].blocks_total == (8000 + 2000) // 40  # the pool grew by the freed weights
            assert [a.counters.commit_calls for a in e.agents] == [1, 0]  # Commit goes to the leader only
            assert e.published == [(3, ("g1",))]

            record = await e.executor.execute(restore_spec(4, drop), e.endpoints, on_committed=e.on_committed,
                                              current_epoch=3)
            assert record.phase is P.COMPLETED
            assert layout(e.agents) == [(0, 4, agent_pb2.ROLE_REPLICA, 4), (0, 4, agent_pb2.ROLE_REPLICA, 4)]
            assert e.published == [(3, ("g1",)), (4, ("g1",))]

    run(scenario)


def test_a_failed_prepare_aborts_every_member_and_commits_nothing() -> None:
    async def scenario() -> None:
        async with env(3) as e:
            e.agents[2].fail_prepare = "UNAVAILABLE"
            spec = drop_spec(members=("agent-0", "agent-1", "agent-2"), ranges=((0, 2), (2, 3), (3, 4)))
            store = MemoryRecordStore()
            record = await e.executor.execute(spec, e.endpoints, store=store, on_committed=e.on_committed)
            assert record.phase is P.ROLLED_BACK and store.phases[-1] is P.ROLLED_BACK
            assert "agent-2: UNAVAILABLE" in record.message
            assert [a.counters.abort_calls for a in e.agents] == [1, 1, 1]
            assert [a.counters.aborts for a in e.agents] == [1, 1, 0]  # the two that had prepared dropped it
            assert all(a.prepared is None for a in e.agents)
            assert sum(a.counters.commit_calls for a in e.agents) == 0 and e.published == []
            assert layout(e.agents) == [(0, 4, agent_pb2.ROLE_REPLICA, 0)] * 3

    run(scenario)


def test_an_agent_without_prepare_rolls_back_with_a_clear_message() -> None:
    async def scenario() -> None:
        async with env() as e:
            e.agents[1].fail_prepare = "UNIMPLEMENTED"
            record = await e.executor.execute(drop_spec(), e.endpoints)
            assert record.phase is P.ROLLED_BACK
            assert "does not implement Prepare" in record.message

    run(scenario)


def test_a_failed_commit_aborts_every_member_and_rolls_back() -> None:
    async def scenario() -> None:
        async with env() as e:
            e.agents[0].fail_commit = "ABORTED"
            store = MemoryRecordStore()
            record = await e.executor.execute(drop_spec(), e.endpoints, store=store, on_committed=e.on_committed)
            assert record.phase is P.ROLLED_BACK and "ABORTED" in record.message
            assert P.COMMITTED not in store.phases and e.published == []
            assert [a.counters.abort_calls for a in e.agents] == [1, 1]
            assert layout(e.agents) == [(0, 4, agent_pb2.ROLE_REPLICA, 0)] * 2
            assert all(a.prepared is None for a in e.agents)

    run(scenario)


def test_commit_on_a_member_that_is_not_the_leader_is_refused() -> None:
    async def scenario() -> None:
        async with env() as e:
            spec = drop_spec()
            stages = stage_specs(spec.groups[0].stages, e.endpoints)
            for a in e.agents:
                await e.clients.prepare(a.endpoint, 1, Action.DROP, stages, "")
            with pytest.raises(Exception, match="FAILED_PRECONDITION"):
                await e.clients.commit(e.agents[1].endpoint, 1)

    run(scenario)


def test_stale_epochs_and_bad_specs_fail_before_any_agent_is_called() -> None:
    async def scenario() -> None:
        async with env() as e:
            record = await e.executor.execute(drop_spec(epoch=2), e.endpoints, current_epoch=2)
            assert record.phase is P.FAILED and "not newer than the pool's epoch 2" in record.message
            record = await e.executor.execute(drop_spec(ranges=((0, 2), (2, 3))), e.endpoints, num_layers=4)
            assert record.phase is P.FAILED and "must end at the model's 4 layers" in record.message
            record = await e.executor.execute(drop_spec(), {"agent-0": e.agents[0].endpoint})
            assert record.phase is P.FAILED and "no endpoint for ['agent-1']" in record.message
            assert sum(a.counters.prepares + a.counters.status_calls for a in e.agents) == 0

    run(scenario)


def test_resume_from_pending_runs_it_once() -> None:
    async def scenario() -> None:
        async with env() as e:
            record = await e.executor.execute(drop_spec(), e.endpoints, record=ReconfigRecord())
            assert record.phase is P.COMPLETED and e.agents[0].counters.commits_applied == 1

    run(scenario)


def test_resume_from_preparing_prepares_again_idempotently_and_commits_once() -> None:
    async def scenario() -> None:
        async with env() as e:
            spec = drop_spec()
            stages = stage_specs(spec.groups[0].stages, e.endpoints)
            await e.clients.prepare(e.agents[0].endpoint, 1, Action.DROP, stages, "")  # sent before a crash
            interrupted = ReconfigRecord(phase=P.PREPARING, attempts=1, started_at=1.0)
            record = await e.executor.execute(spec, e.endpoints, record=interrupted, on_committed=e.on_committed)
            assert record.phase is P.COMPLETED and record.attempts == 2
            assert e.agents[0].counters.commits_applied == 1 and e.published == [(1, ("g1",))]

    run(scenario)


def test_resume_after_a_commit_that_was_not_recorded_does_not_repeat_it() -> None:
    async def scenario() -> None:
        async with env() as e:
            spec = drop_spec()
            stages = stage_specs(spec.groups[0].stages, e.endpoints)
            for a in e.agents:
                await e.clients.prepare(a.endpoint, 1, Action.DROP, stages, "")
            await e.clients.commit(e.agents[0].endpoint, 1)  # committed; the operator died before recording it
            prepares = sum(a.counters.prepares for a in e.agents)
            interrupted = ReconfigRecord(phase=P.PREPARING, attempts=1, started_at=1.0, prepared_at=2.0)
            record = await e.executor.execute(spec, e.endpoints, record=interrupted, on_committed=e.on_committed)
            assert record.phase is P.COMPLETED and record.committed_groups == ("g1",)
            assert [(m.agent_id, m.layer_start, m.layer_end) for m in record.members] == [
                ("agent-0", 0, 2), ("agent-1", 2, 4)]  # the recorded result, read again
            assert e.agents[0].counters.commits_applied == 1  # not repeated
            assert sum(a.counters.prepares for a in e.agents) == prepares  # nothing prepared again
            assert e.published == [(1, ("g1",))]

    run(scenario)


def test_resume_from_committed_only_publishes() -> None:
    async def scenario() -> None:
        async with env() as e:
            committed = ReconfigRecord(phase=P.COMMITTED, attempts=1, started_at=1.0, prepared_at=2.0,
                                       committed_at=3.0)
            record = await e.executor.execute(drop_spec(), e.endpoints, record=committed, on_committed=e.on_committed)
            assert record.phase is P.COMPLETED and record.committed_groups == ("g1",)
            assert e.published == [(1, ("g1",))]
            assert sum(a.counters.prepares + a.counters.commit_calls for a in e.agents) == 0

    run(scenario)


def test_a_terminal_record_is_returned_as_it_is() -> None:
    async def scenario() -> None:
        async with env() as e:
            for phase in (P.COMPLETED, P.FAILED, P.ROLLED_BACK):
                store = MemoryRecordStore()
                done = ReconfigRecord(phase=phase, message="earlier")
                record = await e.executor.execute(drop_spec(), e.endpoints, record=done, store=store,
                                                  on_committed=e.on_committed)
                assert record == done and store.history == [] and e.published == []
            assert sum(a.counters.status_calls + a.counters.prepares for a in e.agents) == 0

    run(scenario)


def test_a_lost_commit_answer_is_resolved_by_asking_the_leader() -> None:
    async def scenario() -> None:
        settings = ExecutorSettings(prepare_timeout_s=2, commit_timeout_s=0.2, status_timeout_s=2, outcome_checks=2,
                                    outcome_check_interval_s=0.05)
        async with env(settings=settings) as e:
            gate = asyncio.Event()
            e.agents[0].commit_gate = gate
            store = MemoryRecordStore()
            with pytest.raises(OutcomeUnknownError, match="commit outcome unknown"):
                await e.executor.execute(drop_spec(), e.endpoints, store=store, on_committed=e.on_committed)
            assert store.history[-1].phase is P.PREPARING and store.history[-1].prepared_at is not None
            gate.set()  # the leader finishes its commit in its own time
            await asyncio.sleep(0.05)
            record = await e.executor.execute(drop_spec(), e.endpoints, record=store.history[-1], store=store,
                                              on_committed=e.on_committed)
            assert record.phase is P.COMPLETED and e.agents[0].counters.commits_applied == 1
            assert e.published == [(1, ("g1",))]

    run(scenario)


def test_a_silent_leader_after_prepare_is_not_guessed() -> None:
    async def scenario() -> None:
        async with env() as e:
            await e.agents[0].stop()
            interrupted = ReconfigRecord(phase=P.PREPARING, attempts=1, started_at=1.0, prepared_at=2.0)
            with pytest.raises(OutcomeUnknownError, match="leaders do not answer"):
                await e.executor.execute(drop_spec(), e.endpoints, record=interrupted)
            assert e.agents[1].counters.abort_calls == 0  # nothing undone on a guess

    run(scenario)


def test_a_prepare_left_by_an_interrupted_reconfiguration_is_aborted_first() -> None:
    async def scenario() -> None:
        async with env() as e:
            old = drop_spec(epoch=3)
            stages = stage_specs(old.groups[0].stages, e.endpoints)
            await e.clients.prepare(e.agents[1].endpoint, 3, Action.DROP, stages, "abandoned")
            record = await e.executor.execute(drop_spec(epoch=4), e.endpoints)
            assert record.phase is P.COMPLETED and e.agents[1].epoch == 4

    run(scenario)


def test_run_drop_and_restore_from_endpoints_only() -> None:
    async def scenario() -> None:
        async with env() as e:
            dropped = await drop_group(e.endpoints, settings=FAST, group_id="g7")
            assert dropped.record.phase is P.COMPLETED and dropped.spec.epoch == 1
            assert dropped.spec.groups[0].ranges() == ((0, 2), (2, 4))  # an even split by default
            assert layout(e.agents)[1] == (2, 4, agent_pb2.ROLE_STAGE, 1)
            assert "epoch 1 Drop g7: agent-0 [0, 2), agent-1 [2, 4): Completed" in dropped.summary()
            with pytest.raises(ManualReconfigurationError, match="ranges"):
                await drop_group(e.endpoints, [(0, 1), (1, 3)], settings=FAST)
            # Only the leader's endpoint: the group, its members and ranges come from its Status.
            restored = await restore_group({"agent-1": e.agents[1].endpoint}, settings=FAST)
            assert restored.record.phase is P.COMPLETED and restored.spec.epoch == 2
            assert restored.spec.groups[0].members == ("agent-0", "agent-1")
            assert layout(e.agents) == [(0, 4, agent_pb2.ROLE_REPLICA, 2)] * 2
            with pytest.raises(ManualReconfigurationError, match="not in a group"):
                await restore_group(e.endpoints, settings=FAST)

    run(scenario)
