"""Failures around a group: a member that disappears before or during a drop leaves the others serving as
they were; a member lost during the cooperative phase fails the group's requests with a retryable error
(never a hang) and the survivors restore themselves and serve again."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest

from kunserve.rpc.v1 import agent_pb2, inference_pb2
from tests.integration.agent_process import AgentProcess, start_agent
from tests.integration.group_driver import Stream, even_ranges, reconfigure, status, wait_until

GREEDY = inference_pb2.SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
LONG = inference_pb2.SamplingParams(max_tokens=600, temperature=0, ignore_eos=True)  # still running at the kill


def _agents(model: Path, tmp: Path, n: int) -> list[AgentProcess]:
    return [start_agent(model, tmp / f"a{i}", "--agent-id", f"a{i}", "--num-kv-blocks", "64",
                        "--max-num-batched-tokens", "16", "--rpc-timeout", "10") for i in range(n)]


def _kill(agent: AgentProcess) -> None:
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(10)


def _serves(agent: AgentProcess, rid: str) -> list[int]:
    s = Stream(agent, rid, [5, 6, 7, 8], GREEDY).start().wait(60)
    assert s.error is None, s.error
    assert len(s.tokens) == GREEDY.max_tokens
    return s.tokens


def test_a_member_gone_before_prepare_aborts_and_changes_nothing(tiny_dir: Path, tmp_path: Path) -> None:
    agents = _agents(tiny_dir, tmp_path, 2)
    try:
        want = _serves(agents[0], "warm")
        running = Stream(agents[0], "running", [9, 10, 11, 12], GREEDY).start()
        _kill(agents[1])
        with pytest.raises(grpc.RpcError) as err:
            reconfigure(agents, agent_pb2.ACTION_DROP, even_ranges(8, 2), epoch=1)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "does not answer" in (err.value.details() or "")
        st = status(agents[0])
        assert (st.role, st.layer_start, st.layer_end, st.prepared_epoch, st.epoch) == (
            agent_pb2.ROLE_REPLICA, 0, 8, 0, 0)
        assert running.wait(60).error is None and len(running.tokens) == GREEDY.max_tokens
        assert _serves(agents[0], "again") == want
    finally:
        for a in agents:
            a.stop()


def test_a_member_lost_between_prepare_and_commit_rolls_the_drop_back(tiny_dir: Path, tmp_path: Path) -> None:
    agents = _agents(tiny_dir, tmp_path, 2)
    try:
        want = _serves(agents[0], "warm")
        spec_ranges = even_ranges(8, 2)
        from kunserve.rpc.v1 import agent_pb2_grpc
        from tests.integration.group_driver import group_spec

        spec = group_spec(agents, spec_ranges)
        for a in agents:
            with a.channel() as ch:
                agent_pb2_grpc.AgentStub(ch).Prepare(agent_pb2.PrepareRequest(
                    epoch=1, action=agent_pb2.ACTION_DROP, group=spec), timeout=30)
        running = Stream(agents[0], "running", [5, 6, 7, 8], GREEDY).start()
        wait_until(lambda: len(running.tokens) >= 3, timeout=60)
        _kill(agents[1])
        with agents[0].channel() as ch, pytest.raises(grpc.RpcError) as err:
            agent_pb2_grpc.AgentStub(ch).Commit(agent_pb2.CommitRequest(epoch=1), timeout=30)
        assert err.value.code() == grpc.StatusCode.ABORTED
        st = status(agents[0])
        assert (st.role, st.layer_start, st.layer_end, st.epoch) == (agent_pb2.ROLE_REPLICA, 0, 8, 0)
        assert st.kv_blocks_total == 64
        assert running.wait(60).error is None and running.tokens == want  # it never noticed
    finally:
        for a in agents:
            a.stop()


@pytest.mark.parametrize("lost", ["stage", "leader"])
def test_a_member_lost_in_the_cooperative_phase_fails_requests_retryably(
        tiny_dir: Path, tmp_path: Path, lost: str) -> None:
    agents = _agents(tiny_dir, tmp_path, 2)
    try:
        want = _serves(agents[0], "warm")
        reconfigure(agents, agent_pb2.ACTION_DROP, even_ranges(8, 2), epoch=1)
        survivor, victim = (agents[0], agents[1]) if lost == "stage" else (agents[1], agents[0])
        streams = [Stream(survivor, f"r{i}", [5 + i, 6, 7, 8], LONG).start() for i in range(4)]
        wait_until(lambda: all(len(s.tokens) >= 2 for s in streams), timeout=60)
        t0 = time.monotonic()
        _kill(victim)
        for s in streams:
            s.wait(60)  # never a hang
            assert s.error is not None and s.error.code() == grpc.StatusCode.UNAVAILABLE, s.error
            assert "group" in (s.error.details() or "")
        failed_after = time.monotonic() - t0
        # The survivor restores every layer from its checkpoint and serves alone again.
        wait_until(lambda: status(survivor).role == agent_pb2.ROLE_REPLICA, timeout=30)
        st = status(survivor)
        assert (st.layer_start, st.layer_end, st.kv_blocks_total, st.kv_blocks_free) == (0, 8, 64, 64)
        assert _serves(survivor, "after") == want
        print(f"{lost} lost: requests failed after {failed_after:.2f}s")
    finally:
        for a in agents:
            a.stop()
