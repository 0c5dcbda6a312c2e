"""Peer service across processes: a restoring agent pulls its dropped layers from a peer, and a request's
KV is pulled layer by layer from the agent that holds it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kunserve.agent.engine.config import EngineConfig
from kunserve.agent.engine.llm_engine import LLMEngine
from kunserve.agent.engine.migration import read_kv
from kunserve.agent.engine.sequence import SamplingParams
from kunserve.agent.layer_store import LayerStore
from kunserve.agent.peer import PeerError, PeerWeightSource, pull_kv
from kunserve.rpc.v1 import inference_pb2, inference_pb2_grpc
from tests.integration.agent_process import AgentProcess, start_agent


@pytest.fixture(scope="module", params=["tiny_dir", "tiny_untied_dir"])
def peer(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[AgentProcess, Path]]:
    model_dir: Path = request.getfixturevalue(request.param)
    proc = start_agent(model_dir, tmp_path_factory.mktemp("peer"), "--num-kv-blocks", "64")
    yield proc, model_dir
    assert proc.stop() == 0


def _engine(model_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), progress=False, num_kv_blocks=64))


@pytest.mark.parametrize("keep", [(0, 4), (4, 8), (2, 5)])
def test_restore_pulls_dropped_layers_from_a_peer(peer: tuple[AgentProcess, Path], keep: tuple[int, int]) -> None:
    agent, model_dir = peer
    reference = _engine(model_dir).model.state_dict()
    engine = _engine(model_dir)
    store = LayerStore(engine)
    store.drop(*keep)
    result = store.restore(PeerWeightSource(agent.target))
    assert result.loaded_bytes > 0
    state = engine.model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    out = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert out.token_ids == _engine(model_dir).generate([[5, 6, 7, 8]], SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True))[0].token_ids


def test_pull_kv_of_a_running_request(peer: tuple[AgentProcess, Path]) -> None:
    agent, model_dir = peer
    prompt = list(range(40, 75))
    stub = inference_pb2_grpc.InferenceStub(agent.channel())
    request = inference_pb2.GenerateRequest(
        request_id="kv-1", token_ids=inference_pb2.TokenIds(ids=prompt),
        sampling=inference_pb2.SamplingParams(max_tokens=500, ignore_eos=True))
    stream = stub.Generate(request, timeout=60)
    generated = [t for _ in range(3) for t in next(stream).token_ids]
    kv = pull_kv(agent.target, "kv-1", [0, 5, 7])
    tokens = kv[0].shape[1]
    assert sorted(kv) == [0, 5, 7] and len(prompt) + 2 <= tokens
    while len(prompt) + len(generated) < tokens:
        generated += next(stream).token_ids
    stream.cancel()
    # The same tokens prefilled in one go on a local engine give the same KV (up to fp32 rounding).
    local = _engine(model_dir)
    local.add_request(prompt + generated[: tokens - len(prompt)], SamplingParams(max_tokens=2, temperature=0.0),
                      request_id="x")
    local.step()
    expected = read_kv(local, "x", [0, 5, 7])
    for layer in (0, 5, 7):
        assert kv[layer].shape == (2, tokens, local.kv_cache.num_kv_heads, local.kv_cache.head_dim)
        torch.testing.assert_close(kv[layer], expected[layer], atol=1e-4, rtol=1e-4)


def test_missing_things_are_not_found(peer: tuple[AgentProcess, Path]) -> None:
    agent, _ = peer
    with pytest.raises(PeerError, match="NOT_FOUND"):
        pull_kv(agent.target, "no-such-request", [0])
    with pytest.raises(PeerError, match="NOT_FOUND"):
        PeerWeightSource(agent.target).read_weights(["layers.99.qkv_proj.weight"])
