"""A real agent process over gRPC on loopback: Generate streams, Abort, errors, Status, WatchPressure,
/metrics and graceful shutdown."""

from __future__ import annotations

import argparse
import math
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from kunserve.agent.agent_cmd import add_arguments, parse_size, resolve
from kunserve.agent.engine.config import EngineConfig
from kunserve.agent.engine.llm_engine import LLMEngine
from kunserve.agent.engine.sequence import SamplingParams
from kunserve.rpc.v1 import agent_pb2, agent_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.integration.agent_process import AgentProcess, start_agent
from tests.integration.group_driver import metric

PROMPTS = [[5, 6, 7], list(range(10, 40)), list(range(100, 117)), [42] * 9, list(range(300, 360)), [7, 8]]
BLOCKS = 128


@pytest.fixture(scope="module")
def agent(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    proc = start_agent(tiny_dir, tmp_path_factory.mktemp("agent"), "--num-kv-blocks", str(BLOCKS),
                       "--agent-id", "agent-0")
    yield proc
    assert proc.stop() == 0, proc.log_path.read_text()


def _request(rid: str, ids: list[int], **sampling: object) -> inference_pb2.GenerateRequest:
    params = {"max_tokens": 24, "ignore_eos": True, **sampling}
    return inference_pb2.GenerateRequest(request_id=rid, token_ids=inference_pb2.TokenIds(ids=ids),
                                         sampling=inference_pb2.SamplingParams(**params))


def _collect(stub: inference_pb2_grpc.InferenceStub, req: inference_pb2.GenerateRequest) -> list:
    return list(stub.Generate(req, timeout=60))


def test_concurrent_streams_match_the_in_process_engine(agent: AgentProcess, tiny_dir: Path) -> None:
    stub = inference_pb2_grpc.InferenceStub(agent.channel())
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        streams = list(pool.map(lambda i: _collect(stub, _request(f"c{i}", PROMPTS[i])), range(len(PROMPTS))))
    engine = LLMEngine(EngineConfig(model=str(tiny_dir), progress=False, num_kv_blocks=BLOCKS))
    expected = engine.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    for msgs, want in zip(streams, expected, strict=True):
        assert [t for m in msgs for t in m.token_ids] == want.token_ids
        assert "".join(m.text for m in msgs) == want.text
        assert [m.finish_reason for m in msgs[:-1]] == [inference_pb2.FINISH_REASON_UNSPECIFIED] * (len(msgs) - 1)
        assert msgs[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
        assert msgs[-1].usage.completion_tokens == 24 and msgs[-1].usage.prompt_tokens == len(want.prompt_token_ids)
        assert msgs[0].ttft_s > 0 and all(m.ttft_s == 0 for m in msgs[1:])


def test_seeded_sampling_over_grpc_is_reproducible(agent: AgentProcess) -> None:
    stub = inference_pb2_grpc.InferenceStub(agent.channel())
    a = _collect(stub, _request("s1", PROMPTS[1], temperature=0.9, top_p=0.95, seed=1234))
    b = _collect(stub, _request("s2", PROMPTS[1], temperature=0.9, top_p=0.95, seed=1234))
    c = _collect(stub, _request("s3", PROMPTS[1], temperature=0.9, top_p=0.95, seed=99))
    tokens = [[t for m in msgs for t in m.token_ids] for msgs in (a, b, c)]
    assert tokens[0] == tokens[1] and tokens[0] != tokens[2]


def test_abort_and_client_cancel_free_every_block(agent: AgentProcess) -> None:
    channel = agent.channel()
    stub = inference_pb2_grpc.InferenceStub(channel)
    status = agent_pb2_grpc.AgentStub(channel)
    stream = stub.Generate(_request("ab", PROMPTS[4], max_tokens=1900), timeout=60)
    next(stream)  # running
    assert stub.Abort(inference_pb2.AbortRequest(request_id="ab"), timeout=5).found
    rest = list(stream)
    assert rest[-1].finish_reason == inference_pb2.FINISH_REASON_ABORT
    assert not stub.Abort(inference_pb2.AbortRequest(request_id="ab"), timeout=5).found
    generated = metric(agent, "vllm:generation_tokens_total")
    assert generated > 0  # "ab" made some: the counter is there
    cancelled = stub.Generate(_request("cx", PROMPTS[4], max_tokens=1900), timeout=60)
    next(cancelled)
    cancelled.cancel()
    for _ in range(100):  # bounded: the agent frees the request's blocks after the cancel
        s = status.Status(agent_pb2.StatusRequest(), timeout=5)
        if s.kv_blocks_free == s.kv_blocks_total:
            break
        time.sleep(0.05)
    assert s.kv_blocks_free == s.kv_blocks_total == BLOCKS
    # it was stopped, not left to finish: far fewer than its 1,900 tokens were made
    assert metric(agent, "vllm:generation_tokens_total") - generated < 1000
    assert not stub.Abort(inference_pb2.AbortRequest(request_id="cx"), timeout=5).found


@pytest.mark.parametrize(
    ("req", "needle"),
    [
        (_request("", [1, 2]), "request_id"),
        (inference_pb2.GenerateRequest(request_id="e1", sampling=inference_pb2.SamplingParams(max_tokens=4)), "prompt"),
        (_request("e2", [1, 2], max_tokens=0), "max_tokens"),
        (_request("e3", [1, 2], temperature=math.nan), "temperature"),
        (_request("e4", [1, 2], temperature=-1.0), "temperature"),
        (_request("e5", [1, 2], top_p=1.5), "top_p"),
        (_request("e6", [1, 2], top_k=-3), "top_k"),
        (_request("e7", [1, 999999]), "token ids"),
        (_request("e8", [5] * 3000), "prompt has 3000 tokens"),
    ],
)
def test_bad_input_is_invalid_argument(agent: AgentProcess, req: inference_pb2.GenerateRequest, needle: str) -> None:
    stub = inference_pb2_grpc.InferenceStub(agent.channel())
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(req, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.value.details() or "")


def test_status_pressure_and_metrics(agent: AgentProcess) -> None:
    channel = agent.channel()
    status = agent_pb2_grpc.AgentStub(channel).Status(agent_pb2.StatusRequest(), timeout=5)
    assert (status.agent_id, status.model, status.num_layers, status.layer_start, status.layer_end) == (
        "agent-0", "tiny", 8, 0, 8)
    assert status.role == agent_pb2.ROLE_REPLICA and status.kv_blocks_total == BLOCKS
    stub = inference_pb2_grpc.InferenceStub(channel)
    long_run = stub.Generate(_request("p1", PROMPTS[4], max_tokens=400), timeout=60)
    next(long_run)
    watch = agent_pb2_grpc.AgentStub(channel).WatchPressure(agent_pb2.WatchPressureRequest(interval_ms=20), timeout=10)
    samples = [next(watch) for _ in range(3)]
    watch.cancel()
    assert all(s.agent_id == "agent-0" and s.blocks_total == BLOCKS for s in samples)
    assert any(s.num_running == 1 and s.blocks_needed >= 4 for s in samples)
    assert samples[0].timestamp < samples[-1].timestamp
    stub.Abort(inference_pb2.AbortRequest(request_id="p1"), timeout=5)
    list(long_run)
    text = urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=5).read().decode()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:cache_config_info", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
                 "vllm:num_preemptions_total", "kunserve_kv_blocks_total", "kunserve_kv_blocks_free",
                 "kunserve_layers_held", "kunserve_layers_dropped", "kunserve_group_epoch"):
        assert f"\n{name}" in text, name
    assert f'kunserve_kv_blocks_total{{model_name="tiny"}} {float(BLOCKS)}' in text
    generated = [line for line in text.splitlines() if line.startswith("vllm:generation_tokens_total")]
    assert generated and float(generated[0].split()[-1]) > 0


def test_config_file_and_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("model: /models/x\nmax_num_seqs: 8\nmemory-budget: 2GiB\nport: 6000\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    s = resolve(parser.parse_args(["--config", str(cfg), "--port", "7000"]))
    assert (s["model"], s["max-num-seqs"], s["memory-budget"], s["port"]) == ("/models/x", 8, 2 * 1024**3, 7000)
    assert s["model-name"] == "x"
    cfg.write_text("model: /m\nbogus: 1\n")
    with pytest.raises(SystemExit, match="unknown option 'bogus'"):
        resolve(parser.parse_args(["--config", str(cfg)]))
    assert parse_size("512MiB") == 512 * 1024**2 and parse_size("1.5GB") == 1_500_000_000


def test_missing_model_fails_fast(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="missing: checkpoint directory not found"):
        start_agent(tmp_path / "missing", tmp_path / "w", timeout=30)
