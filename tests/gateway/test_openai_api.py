"""The official `openai` client against a real gateway, two agent processes and redis-server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from openai import OpenAI

from kunserve.agent.model.tokenizer import Tokenizer
from kunserve.rpc.v1 import inference_pb2, inference_pb2_grpc
from tests.gateway.conftest import API_KEY
from tests.gateway.processes import GatewayProcess, prometheus_value, request
from tests.integration.agent_process import AgentProcess

MODEL = "tiny"
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}


@pytest.fixture(scope="module")
def client(gateway: GatewayProcess) -> OpenAI:
    return OpenAI(base_url=f"{gateway.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _agent_reference(agent: AgentProcess, ids: list[int], max_tokens: int) -> tuple[list[int], str]:
    """Greedy output straight from an agent over gRPC, bypassing the gateway."""
    with grpc.insecure_channel(agent.target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        req = inference_pb2.GenerateRequest(
            request_id="reference", token_ids=inference_pb2.TokenIds(ids=ids),
            sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        msgs = list(stub.Generate(req, timeout=60))
    return [t for m in msgs for t in m.token_ids], "".join(m.text for m in msgs)


def test_completion_matches_the_agent(client: OpenAI, agents: list[AgentProcess], tiny_dir: Path) -> None:
    prompt = "Once upon a time"
    ids = Tokenizer(tiny_dir).encode(prompt)
    want_ids, want_text = _agent_reference(agents[0], ids, 24)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, **GREEDY)
    choice = r.choices[0]
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert choice.text == want_text
    assert choice.model_extra is not None and choice.model_extra["token_ids"] == want_ids
    assert choice.finish_reason == "length"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 24, len(ids) + 24)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, **GREEDY)  # token-id prompt
    assert by_ids.choices[0].text == want_text


def test_streaming_completion_equals_the_whole_one(client: OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt="The river", max_tokens=40, **GREEDY)
    chunks = list(client.completions.create(model=MODEL, prompt="The river", max_tokens=40, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    with_choice = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in with_choice) == whole.choices[0].text
    ids = [t for c in with_choice for t in (c.choices[0].model_extra or {}).get("token_ids", [])]
    assert ids == (whole.choices[0].model_extra or {})["token_ids"]
    assert with_choice[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choice[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 40 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_streaming_and_not(client: OpenAI, tiny_dir: Path) -> None:
    messages: Any = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a river."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                           extra_body={"ignore_eos": True})
    prompt_ids = Tokenizer(tiny_dir).encode_chat(messages)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.prompt_tokens == len(prompt_ids)
    assert whole.usage.completion_tokens == 20
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == len(prompt_ids) + 20
    plain = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, stream=True))
    assert all(c.usage is None for c in plain)


def test_stop_string_ends_the_text(client: OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, **GREEDY)
    text = full.choices[0].text
    stop = text[12:16]
    assert stop.strip(), text
    cut = text[: text.index(stop)]
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, stop=[stop], **GREEDY)
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, stop=stop,
                                            stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client: OpenAI) -> None:
    def sample(seed: int) -> str:
        r = client.completions.create(model=MODEL, prompt="A story", max_tokens=24, temperature=0.9, top_p=0.95,
                                      seed=seed, extra_body={"ignore_eos": True})
        return r.choices[0].text

    assert sample(7) == sample(7) != sample(8)


def test_models_health_openapi_and_metrics(client: OpenAI, gateway: GatewayProcess) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    status, _, body = request(gateway.base_url, "GET", "/health")  # no key needed
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok"
    assert sorted(r["id"] for r in health["replicas"]) == ["agent-0", "agent-1"]
    status, _, body = request(gateway.base_url, "GET", "/openapi.json")
    spec = json.loads(body)
    assert status == 200 and {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(spec["paths"])
    status, _, body = request(gateway.base_url, "GET", "/metrics")
    text = body.decode()
    assert status == 200
    assert prometheus_value(text, "kunserve_gateway_requests_total", 'status="200"') > 0
    assert prometheus_value(text, "kunserve_gateway_time_to_first_token_seconds_count") > 0
    assert "kunserve_gateway_replays_total" in text and "kunserve_gateway_requests_in_flight" in text


def test_api_keys(gateway: GatewayProcess, client: OpenAI) -> None:
    wrong = OpenAI(base_url=f"{gateway.base_url}/v1", api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert err.value.status_code == 401
    status, headers, body = request(gateway.base_url, "POST", "/v1/completions",
                                    {"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    status, _, _ = request(gateway.base_url, "GET", "/v1/models", headers={"authorization": "Basic abc"})
    assert status == 401
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].finish_reason
    assert API_KEY not in gateway.log() and "sk-wrong" not in gateway.log()


AUTH = {"authorization": f"Bearer {API_KEY}"}
CASES: list[tuple[str, str, Any, int, str | None]] = [
    # (name, path, body, status, param)
    ("n", "/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
    ("best_of", "/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("logprobs", "/v1/completions", {"prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ("tools", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                       "tools": [{"type": "function"}]}, 400, "tools"),
    ("unknown", "/v1/completions", {"prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ("max_tokens=0", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens huge", "/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens"),
    ("max_tokens > context", "/v1/completions", {"prompt": "hi", "max_tokens": 2047}, 400, "max_tokens"),
    ("negative temperature", "/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("top_p 0", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("negative seed", "/v1/completions", {"prompt": "hi", "seed": -5}, 400, "seed"),
    ("prompt too long", "/v1/completions", {"prompt": [5] * 2048}, 400, "prompt"),
    ("token id out of vocab", "/v1/completions", {"prompt": [5, 99999]}, 400, "prompt"),
    ("batch of prompts", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("stop_token_ids", "/v1/completions", {"prompt": "hi", "stop_token_ids": [5000]}, 400, "stop_token_ids"),
    ("empty stop", "/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("no messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("image part", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content"),
    ("wrong model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model"),
    ("no model", "/v1/completions", {"prompt": "hi", "model": None}, 400, "model"),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "param"), CASES, ids=[c[0] for c in CASES])
def test_bad_requests_get_openai_errors(gateway: GatewayProcess, name: str, path: str, body: Any, status: int,
                                        param: str | None) -> None:
    got, _, raw = request(gateway.base_url, "POST", path, {"model": MODEL, **body}, AUTH)
    error = json.loads(raw)["error"]
    assert got == status, raw
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error


@pytest.mark.parametrize(("raw", "param"), [
    (b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', "temperature"),
    (b'{"model": "tiny", "prompt": "hi", "top_p": Infinity}', "top_p"),
    (b'{"model": "tiny", "prompt": "hi",', None),  # invalid JSON
    (b"[1, 2, 3]", None),
    (b"", None),
], ids=["nan", "infinity", "invalid-json", "not-an-object", "empty"])
def test_raw_bodies_get_400(gateway: GatewayProcess, raw: bytes, param: str | None) -> None:
    status, _, body = request(gateway.base_url, "POST", "/v1/completions", raw, AUTH)
    assert status == 400, body
    assert json.loads(body)["error"]["param"] == param


def test_oversized_body_gets_413(gateway: GatewayProcess) -> None:
    big = {"model": MODEL, "prompt": "x" * (1024 * 1024 + 10)}
    status, _, body = request(gateway.base_url, "POST", "/v1/completions", big, AUTH)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    chunked_ok, _, _ = request(gateway.base_url, "POST", "/v1/completions",
                               {"model": MODEL, "prompt": "hi", "max_tokens": 1}, AUTH)
    assert chunked_ok == 200
