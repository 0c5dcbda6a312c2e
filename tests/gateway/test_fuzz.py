"""Fuzzing the gateway: schemathesis cases from the served OpenAPI spec (valid and schema-violating),
plus hypothesis-made hostile bodies. Zero 5xx; every 4xx carries an OpenAI-style error body."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.gateway.conftest import API_KEY, static_topology
from tests.gateway.processes import GatewayProcess, RedisProcess, request, start_gateway
from tests.integration.agent_process import AgentProcess

AUTH = {"authorization": f"Bearer {API_KEY}"}
CONTEXT = 64
UNSUPPORTED = ("n", "best_of", "echo", "logprobs", "top_logprobs", "suffix", "presence_penalty",
               "frequency_penalty", "logit_bias", "tools", "tool_choice", "functions", "function_call",
               "response_format", "stream_options")
SETTINGS = settings(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck),
                    phases=[Phase.explicit, Phase.generate])


@pytest.fixture(scope="module")
def fuzz_gateway(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory, agents: list[AgentProcess],
                 redis_server: RedisProcess) -> Iterator[GatewayProcess]:
    """Small limits so accepted requests are cheap: context 64 tokens, max_tokens <= 4."""
    gw = start_gateway(tiny_dir, tmp_path_factory.mktemp("fuzz-gw"), "--pool", "fuzz", "--redis", redis_server.url,
                       "--static-topology", static_topology(agents), "--max-model-len", str(CONTEXT),
                       "--max-tokens-limit", "4", env={"KUNSERVE_API_KEYS": f"other-key,{API_KEY}"})
    yield gw
    gw.stop()


def check_response(status: int, content_type: str, body: bytes, what: str) -> None:
    assert status < 500, f"{what}: {status} {body[:500]!r}"
    if status >= 400:
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str), what
    elif content_type.startswith("text/event-stream"):
        events = [b for b in body.decode().split("\n\n") if b]
        assert events[-1] == "data: [DONE]", what
        assert not any(e.startswith('data: {"error"') for e in events), what


def _supported_only(body: dict[str, Any]) -> None:
    for name in UNSUPPORTED:
        body.pop(name, None)
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(name), int) and body[name] > 4:
            body.pop(name)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], list | str):
        body["prompt"] = prompt[:1]
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            message.pop("tool_calls", None)
            message.pop("tool_call_id", None)


def _fuzz(strategy: Any, examples: int, base_url: str, statuses: Counter[int], what: str) -> None:
    @settings(SETTINGS, max_examples=examples)
    @given(case=strategy, variant=st.sampled_from(["as generated", "served model", "supported", "supported"]))
    def run(case: Any, variant: str) -> None:
        if variant != "as generated" and isinstance(case.body, dict):
            case.body["model"] = "tiny"  # else nearly every valid case is a 404 for an unknown model
            if variant == "supported":  # else most valid cases are a 400 for something the gateway refuses
                _supported_only(case.body)
        response = case.call(base_url=base_url, headers=AUTH, timeout=60)
        statuses[response.status_code] += 1
        content_type = (response.headers.get("content-type") or [""])[0]
        if response.stream_cut_short or len(response.content) < response.content_size:
            content_type = "partial"  # only part of the stream was kept: check the status only
        check_response(response.status_code, content_type, response.content, what)

    run()


def test_schemathesis_cases_never_get_5xx(fuzz_gateway: GatewayProcess) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_gateway.base_url}/openapi.json")
    statuses: Counter[int] = Counter()
    plan = [("/v1/completions", "POST", GenerationMode.POSITIVE, 170),
            ("/v1/completions", "POST", GenerationMode.NEGATIVE, 90),
            ("/v1/chat/completions", "POST", GenerationMode.POSITIVE, 170),
            ("/v1/chat/completions", "POST", GenerationMode.NEGATIVE, 90),
            ("/v1/models", "GET", GenerationMode.POSITIVE, 5), ("/health", "GET", GenerationMode.POSITIVE, 5)]
    for path, method, mode, examples in plan:
        strategy = schema[path][method].as_strategy(generation_mode=mode)
        _fuzz(strategy, examples, fuzz_gateway.base_url, statuses, f"{method} {path} ({mode.value})")
    total = sum(statuses.values())
    print(f"schemathesis: {total} requests, statuses {sorted(statuses.items())}")
    assert total >= 500, statuses
    assert statuses[200] >= 50 and sum(n for s, n in statuses.items() if 400 <= s < 500) >= 100, statuses


NUMERIC = ["max_tokens", "temperature", "top_p", "top_k", "seed", "n", "presence_penalty", "best_of"]
BAD_NUMBERS = st.one_of(st.integers(max_value=-1), st.sampled_from([math.nan, math.inf, -math.inf, 10**40, -0.5]))


@settings(SETTINGS, max_examples=120)
@given(data=st.data())
def test_hostile_bodies_get_4xx(fuzz_gateway: GatewayProcess, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["number", "json", "prompt", "tokens"]))
    body: bytes
    if kind == "number":  # negative, NaN, infinite or absurd numeric parameters
        param = data.draw(st.sampled_from(NUMERIC))
        body = json.dumps({"model": "tiny", "prompt": "hi", param: data.draw(BAD_NUMBERS)}).encode()
    elif kind == "json":  # not JSON, or JSON cut short
        good = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode()
        body = data.draw(st.one_of(st.binary(max_size=64), st.integers(1, len(good) - 1).map(lambda n: good[:n])))
    elif kind == "prompt":  # longer than the context
        words = data.draw(st.integers(CONTEXT + 1, 4 * CONTEXT))
        body = json.dumps({"model": "tiny", "prompt": " word" * words}).encode()
    else:  # token-id prompts out of the vocabulary or over the context
        ids = data.draw(st.one_of(st.lists(st.integers(2048, 2**31 - 1), min_size=1, max_size=4),
                                  st.lists(st.integers(0, 2047), min_size=CONTEXT, max_size=CONTEXT + 8)))
        body = json.dumps({"model": "tiny", "prompt": ids}).encode()
    status, headers, raw = request(fuzz_gateway.base_url, "POST", "/v1/completions", body, AUTH)
    assert 400 <= status < 500, (kind, body[:200], status, raw[:300])
    check_response(status, headers.get("content-type", ""), raw, kind)


def test_an_oversized_body_is_refused_before_it_is_read(fuzz_gateway: GatewayProcess) -> None:
    body = json.dumps({"model": "tiny", "prompt": "y" * (2 * 1024 * 1024)}).encode()
    status, _, raw = request(fuzz_gateway.base_url, "POST", "/v1/chat/completions", body, AUTH)
    assert status == 413 and json.loads(raw)["error"]["type"] == "invalid_request_error"
