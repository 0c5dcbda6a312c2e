"""A crash in the middle of a reconfiguration, driven through the operator's executor: what each one leaves.

- Prepare without Commit (the controller died after Prepare): the next run aborts the leftover and the
  agents' `prepared_epoch` goes back to 0; a resumed record (Preparing) commits instead of repeating.
- A follower killed after Prepare, before the leader's Commit: the leader rolls the drop back; every block
  is free again, the leader's running request never notices.
- The leader killed in the cooperative phase: the follower disbands itself (all layers back, role replica,
  every block free); the restore the executor then tries is refused and recorded as rolled back.
- The controller killed while its Commit is in flight (the leader waits for a follower's Join): the resumed
  executor must leave the group committed or rolled back, never mixed.

Every agent is checked the same way at the end (`assert_serving_alone`): role replica, every layer, nothing
prepared, free == total KV blocks once idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import pytest

from kunserve.operator.agent_client import AgentClients, CommitOutcome
from kunserve.operator.executor import MemoryRecordStore, OutcomeUnknownError, drop_group, restore_group
from kunserve.operator.plan_types import StagePlan
from kunserve.operator.reconfig import Action, GroupChange, ReconfigPhase, ReconfigRecord, ReconfigSpec
from kunserve.rpc.v1 import agent_pb2, agent_pb2_grpc, inference_pb2
from tests.integration.agent_process import AgentProcess, start_agent
from tests.integration.group_driver import Stream, even_ranges, group_spec, status, wait_until

GREEDY = inference_pb2.SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
LAYERS = 8  # the tiny preset


def _agents(model: Path, tmp: Path, n: int = 2) -> list[AgentProcess]:
    return [start_agent(model, tmp / f"a{i}", "--agent-id", f"a{i}", "--num-kv-blocks", "64",
                        "--max-num-batched-tokens", "16", "--rpc-timeout", "5") for i in range(n)]


def _endpoints(agents: list[AgentProcess]) -> dict[str, str]:
    return {a.agent_id: a.target for a in agents}


def _kill(agent: AgentProcess) -> None:
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(10)


def assert_serving_alone(agent: AgentProcess, timeout: float = 30.0) -> agent_pb2.StatusResponse:
    """Role replica, every layer, nothing prepared, every KV block free (waits for it, bounded)."""
    def settled() -> bool:
        st = status(agent)
        return (st.role == agent_pb2.ROLE_REPLICA and st.kv_blocks_free == st.kv_blocks_total
                and st.prepared_epoch == 0)

    with contextlib.suppress(TimeoutError):
        wait_until(settled, timeout=timeout, interval=0.1)
    st = status(agent)
    assert (st.role, st.layer_start, st.layer_end, st.prepared_epoch) == (agent_pb2.ROLE_REPLICA, 0, LAYERS, 0), st
    assert st.kv_blocks_free == st.kv_blocks_total == 64, st
    return st


def _serve(agent: AgentProcess, rid: str) -> list[int]:
    s = Stream(agent, rid, [5, 6, 7, 8], GREEDY).start().wait(60)
    assert s.error is None, s.error
    return s.tokens


def _prepare(agents: list[AgentProcess], epoch: int, action: int = agent_pb2.ACTION_DROP) -> None:
    spec = group_spec(agents, even_ranges(LAYERS, len(agents)))
    for a in agents:
        with a.channel() as ch:
            agent_pb2_grpc.AgentStub(ch).Prepare(agent_pb2.PrepareRequest(epoch=epoch, action=action, group=spec),
                                                 timeout=30)


def _drop_spec(agents: list[AgentProcess], epoch: int) -> ReconfigSpec:
    names = tuple(a.agent_id for a in agents)
    stages = tuple(StagePlan(n, s, e) for n, (s, e) in zip(names, even_ranges(LAYERS, len(agents)), strict=True))
    return ReconfigSpec(pool="chaos", epoch=epoch, action=Action.DROP, groups=(GroupChange("g", names, stages),),
                        reason="chaos", manual=True)


def test_a_prepare_left_by_a_dead_controller_is_aborted_by_the_next_run(tiny_dir: Path, tmp_path: Path) -> None:
    agents = _agents(tiny_dir, tmp_path)
    try:
        _prepare(agents, epoch=1)  # the controller died here: nobody commits epoch 1
        assert [status(a).prepared_epoch for a in agents] == [1, 1]
        log = asyncio.run(drop_group(_endpoints(agents), epoch=2))
        assert log.record.phase is ReconfigPhase.COMPLETED, log.record
        assert [(status(a).epoch, status(a).prepared_epoch) for a in agents] == [(2, 0), (2, 0)]
        log = asyncio.run(restore_group(_endpoints(agents), epoch=3))
        assert log.record.phase is ReconfigPhase.COMPLETED, log.record
        for a in agents:
            assert_serving_alone(a)
    finally:
        for a in agents:
            a.stop()


def test_a_resumed_preparing_record_commits_once(tiny_dir: Path, tmp_path: Path) -> None:
    agents = _agents(tiny_dir, tmp_path)
    try:
        _prepare(agents, epoch=1)  # the record says Preparing, prepared: Commit may or may not have gone out
        record = ReconfigRecord(phase=ReconfigPhase.PREPARING, attempts=1, started_at=1.0, prepared_at=2.0)
        store = MemoryRecordStore()

        async def resume() -> ReconfigRecord:
            clients = AgentClients()
            try:
                from kunserve.operator.executor import Executor
                return await Executor(clients).execute(_drop_spec(agents, 1), _endpoints(agents), record=record,
                                                       store=store, num_layers=LAYERS)
            finally:
                await clients.close()

        final = asyncio.run(resume())
        assert final.phase is ReconfigPhase.COMPLETED and final.committed_groups == ("g",), final
        st = [status(a) for a in agents]
        assert [(s.epoch, s.prepared_epoch, s.role) for s in st] == [
            (1, 0, agent_pb2.ROLE_LEADER), (1, 0, agent_pb2.ROLE_STAGE)]
        assert asyncio.run(restore_group(_endpoints(agents), epoch=2)).record.phase is ReconfigPhase.COMPLETED
        for a in agents:
            assert_serving_alone(a)
    finally:
        for a in agents:
            a.stop()


class _KillBeforeCommit(AgentClients):
    """The executor's client; the follower is SIGKILLed right before the leader's Commit goes out."""

    def __init__(self, victim: AgentProcess) -> None:
        super().__init__()
        self.victim = victim

    async def commit(self, endpoint: str, epoch: int, timeout_s: float | None = None) -> CommitOutcome:
        _kill(self.victim)
        return await super().commit(endpoint, epoch, timeout_s)


def test_a_follower_killed_after_prepare_is_rolled_back_by_the_leader(tiny_dir: Path, tmp_path: Path) -> None:
    agents = _agents(tiny_dir, tmp_path)
    try:
        want = _serve(agents[0], "warm")
        running = Stream(agents[0], "running", [5, 6, 7, 8], GREEDY).start()
        wait_until(lambda: len(running.tokens) >= 3, timeout=60)

        async def drop() -> ReconfigPhase:
            clients = _KillBeforeCommit(agents[1])
            try:
                return (await drop_group(_endpoints(agents), epoch=1, clients=clients)).record.phase
            finally:
                await clients.close()

        assert asyncio.run(drop()) is ReconfigPhase.ROLLED_BACK
        st = assert_serving_alone(agents[0])
        assert st.epoch == 0
        assert running.wait(60).error is None and running.tokens == want  # it never noticed
    finally:
        for a in agents:
            a.stop()


def test_the_leader_killed_in_the_cooperative_phase_the_follower_disbands(tiny_dir: Path, tmp_path: Path) -> None:
    agents = _agents(tiny_dir, tmp_path)
    try:
        want = _serve(agents[1], "warm")
        assert asyncio.run(drop_group(_endpoints(agents), epoch=1)).record.phase is ReconfigPhase.COMPLETED
        assert status(agents[1]).role == agent_pb2.ROLE_STAGE
        _kill(agents[0])
        # No leader for ~3 s: the follower restores every layer from its checkpoint and serves alone.
        wait_until(lambda: status(agents[1]).role == agent_pb2.ROLE_REPLICA, timeout=30, interval=0.2)
        assert_serving_alone(agents[1])
        assert _serve(agents[1], "after") == want
        # The leader comes back (a restarted pod: same id, same port): the restore of the old group is refused
        # by both, so it is recorded as rolled back and changes nothing.
        agents[0] = start_agent(tiny_dir, tmp_path / "a0", "--agent-id", "a0", "--num-kv-blocks", "64",
                                "--max-num-batched-tokens", "16", "--rpc-timeout", "5", "--port",
                                str(agents[0].grpc_port))
        spec = ReconfigSpec(pool="chaos", epoch=2, action=Action.RESTORE, groups=_drop_spec(agents, 1).groups,
                            reason="chaos", manual=True)

        async def restore() -> ReconfigRecord:
            clients = AgentClients()
            try:
                from kunserve.operator.executor import Executor
                return await Executor(clients).execute(spec, _endpoints(agents), num_layers=LAYERS)
            finally:
                await clients.close()

        assert asyncio.run(restore()).phase is ReconfigPhase.ROLLED_BACK
        for a in agents:
            assert_serving_alone(a)
    finally:
        for a in agents:
            a.stop()


def test_the_controller_dying_during_commit_leaves_no_mixed_group(tiny_dir: Path, tmp_path: Path) -> None:
    """The follower is paused (SIGSTOP) so the leader's Commit waits on its Join; the controller's Commit call
    is then cancelled (its process died). Once the follower runs again, a resumed executor must settle the
    group one way: both members in it at the epoch, or both serving alone with every layer."""
    agents = _agents(tiny_dir, tmp_path)
    try:
        want = _serve(agents[0], "warm")
        running = Stream(agents[0], "running", [5, 6, 7, 8], GREEDY).start()
        wait_until(lambda: len(running.tokens) >= 3, timeout=60)
        _prepare(agents, epoch=1)
        agents[1].proc.send_signal(signal.SIGSTOP)
        try:
            async def commit_then_die() -> None:
                clients = AgentClients()
                try:
                    call = asyncio.ensure_future(clients.commit(agents[0].target, 1, 30.0))
                    await asyncio.sleep(1.0)  # the leader dropped its layers and waits for the Join
                    call.cancel()  # the controller's process is gone: its RPCs are cancelled
                    await asyncio.gather(call, return_exceptions=True)
                finally:
                    await clients.close()

            asyncio.run(commit_then_die())
        finally:
            agents[1].proc.send_signal(signal.SIGCONT)
        record = ReconfigRecord(phase=ReconfigPhase.PREPARING, attempts=1, started_at=1.0, prepared_at=2.0)

        async def resume() -> ReconfigRecord:
            clients = AgentClients()
            try:
                from kunserve.operator.executor import Executor
                for _ in range(3):
                    try:
                        return await Executor(clients).execute(_drop_spec(agents, 1), _endpoints(agents),
                                                               record=record, num_layers=LAYERS)
                    except OutcomeUnknownError:
                        await asyncio.sleep(1.0)
                raise AssertionError("the outcome stayed unknown")
            finally:
                await clients.close()

        final = asyncio.run(resume())
        st = [status(a) for a in agents]
        roles = [(s.role, s.epoch, s.layer_start, s.layer_end) for s in st]
        if final.phase is ReconfigPhase.COMPLETED:
            assert roles == [(agent_pb2.ROLE_LEADER, 1, 0, 4), (agent_pb2.ROLE_STAGE, 1, 4, 8)], (final, roles)
            assert asyncio.run(restore_group(_endpoints(agents), epoch=2)).record.phase is ReconfigPhase.COMPLETED
        else:
            assert final.phase is ReconfigPhase.ROLLED_BACK, final
        for a in agents:
            assert_serving_alone(a)
        assert running.wait(60).error is None and running.tokens == want
        assert _serve(agents[0], "after") == want
    finally:
        for a in agents:
            a.stop()


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
