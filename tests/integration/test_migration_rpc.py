"""Migration service across processes (the Llumnix-style baseline): a running request and a queued one move
to another agent with their KV and the client's stream on the source goes on with the same tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kunserve.agent.group_client import Stream, metric, status, wait_until
from kunserve.rpc.v1 import inference_pb2, migration_pb2, migration_pb2_grpc
from tests.integration.agent_process import AgentProcess, start_agent

# 400 tokens: the tiny model makes one in a few ms, so "run" is still decoding when it is migrated (with 60 it
# could finish between the test seeing its 10th token and the MigrateOut call)
PARAMS = inference_pb2.SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
PROMPT = [3 + (j * 7) % 200 for j in range(30)]


@pytest.fixture(scope="module")
def agents(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AgentProcess]]:
    # the source: 28 blocks of 16 tokens hold one 430-token request; one running request at a time, so a
    # second one queues
    procs = [start_agent(tiny_dir, tmp_path_factory.mktemp(f"mig{i}"), "--agent-id", f"m{i}", "--num-kv-blocks",
                         n, "--block-size", "16", *extra)
             for i, (n, extra) in enumerate((("28", ("--max-num-seqs", "1")), ("64", ())))]
    yield procs
    for p in procs:
        assert p.stop() == 0


def _migrate(source: AgentProcess, target: AgentProcess, rid: str) -> migration_pb2.MigrateOutResponse:
    with source.channel() as ch:
        return migration_pb2_grpc.MigrationStub(ch).MigrateOut(
            migration_pb2.MigrateOutRequest(request_id=rid, target=target.target), timeout=30)


def test_running_and_queued_requests_migrate_with_unchanged_tokens(agents: list[AgentProcess]) -> None:
    src, dst = agents
    reference = Stream(dst, "ref", PROMPT, PARAMS).start().wait(120)
    assert reference.error is None and len(reference.tokens) == 400
    running = Stream(src, "run", PROMPT, PARAMS).start()
    wait_until(lambda: len(running.tokens) >= 10, timeout=60)
    queued = Stream(src, "queued", PROMPT, PARAMS).start()  # waits: "run" is the one running request
    wait_until(lambda: metric(src, "vllm:num_requests_waiting") == 1, timeout=60)
    moved = _migrate(src, dst, "run")
    assert 10 + len(PROMPT) - 1 <= moved.num_tokens < 400 + len(PROMPT) - 1 and moved.kv_bytes > 0
    moved_queued = _migrate(src, dst, "queued")
    for s in (running, queued):
        s.wait(120)
        assert s.error is None, s.error
        assert s.tokens == reference.tokens
    assert moved_queued.num_tokens >= 0
    for a in agents:
        st = status(a)
        assert st.kv_blocks_free == st.kv_blocks_total


def test_unknown_request_and_full_target_are_refused(agents: list[AgentProcess]) -> None:
    src, dst = agents
    with pytest.raises(grpc.RpcError) as err:
        _migrate(src, dst, "nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # "big" needs at least 13 blocks (200-token prompt); the filler holds 16 of the source's 28 blocks when it
    # starts and 28 when it ends (240 + 200 tokens), so the source never has room for "big" while the filler
    # decodes its 200 tokens, long after the refusal
    big_prompt = [3 + (j * 11) % 250 for j in range(200)]
    big = Stream(dst, "big", big_prompt, PARAMS).start()
    wait_until(lambda: len(big.tokens) >= 5, timeout=60)
    filler = Stream(src, "fill", list(range(10, 250)), inference_pb2.SamplingParams(
        max_tokens=200, temperature=0, ignore_eos=True)).start()
    wait_until(lambda: len(filler.tokens) >= 1, timeout=60)
    with pytest.raises(grpc.RpcError) as err:
        _migrate(dst, src, "big")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not filler.done.is_set(), "the filler must still hold the source's blocks after the refusal"
    for s in (filler, big):
        s.wait(120)
        assert s.error is None
    assert big.tokens == Stream(dst, "ref2", big_prompt, PARAMS).start().wait(120).tokens  # it stayed, unchanged
