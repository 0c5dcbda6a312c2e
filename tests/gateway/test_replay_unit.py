"""Token replay and gateway-side text, against scripted agents (no processes): what the replacement agent is
asked, that nothing is repeated or skipped, and that text (stop strings included) continues exactly."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kunserve.agent.engine.output import RequestState
from kunserve.agent.engine.sequence import FinishReason as EngineFinish
from kunserve.agent.engine.sequence import SamplingParams, Sequence
from kunserve.agent.model.text import TextAssembler
from kunserve.agent.model.tokenizer import Tokenizer
from kunserve.gateway.generation import FinishReason, Generation, GenerationParams, GenerationRequest
from kunserve.gateway.journal import Journal, JournalEntry
from kunserve.gateway.metrics import GatewayMetrics
from kunserve.gateway.replicas import ReplicaRegistry, ReplicaState
from kunserve.gateway.router import Router
from kunserve.gateway.topology import ReplicaSpec, Topology
from kunserve.rpc.v1 import inference_pb2

STORY = "Once upon a time there was a river that ran through the old town, and everyone loved it."


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path) -> Tokenizer:
    return Tokenizer(tiny_dir)


class FakeCall:
    """A Generate call that returns scripted messages, then fails with `fail` (a status code), hangs, or ends."""

    def __init__(self, messages: list[inference_pb2.GenerateResponse], fail: grpc.StatusCode | None,
                 hang: bool = False) -> None:
        self.messages, self.fail, self.hang, self.cancelled = list(messages), fail, hang, False

    async def read(self) -> Any:
        await asyncio.sleep(0)
        if self.messages:
            return self.messages.pop(0)
        if self.hang:
            await asyncio.Event().wait()
        if self.fail is not None:
            raise grpc.aio.AioRpcError(self.fail, grpc.aio.Metadata(), grpc.aio.Metadata(), details="socket closed")
        return grpc.aio.EOF

    def cancel(self) -> bool:
        self.cancelled = True
        return True


@dataclass
class Script:
    tokens: list[int]  # what this agent streams, one token per message
    fail: grpc.StatusCode | None = None
    hang: bool = False
    finish: int = inference_pb2.FINISH_REASON_UNSPECIFIED
    requests: list[inference_pb2.GenerateRequest] = field(default_factory=list)
    calls: list[FakeCall] = field(default_factory=list)

    def Generate(self, request: inference_pb2.GenerateRequest, timeout: float) -> FakeCall:
        self.requests.append(request)
        msgs = [inference_pb2.GenerateResponse(request_id=request.request_id, token_ids=[t]) for t in self.tokens]
        if self.finish != inference_pb2.FINISH_REASON_UNSPECIFIED:
            msgs[-1].finish_reason = self.finish  # type: ignore[assignment]
        call = FakeCall(msgs, self.fail, self.hang)
        self.calls.append(call)
        return call


class FakeReplica(ReplicaState):
    script: Script

    @property
    def inference(self) -> Any:
        return self.script


def _router(scripts: dict[str, Script], stale_after_s: float = 2.0) -> Router:
    registry = ReplicaRegistry()
    specs = tuple(ReplicaSpec(rid, f"127.0.0.1:{7000 + i}") for i, rid in enumerate(scripts))
    registry.topology = Topology(epoch=1, replicas=specs)
    for spec in specs:
        state = FakeReplica(spec, channel=None)
        state.script = scripts[spec.id]
        registry.replicas[spec.id] = state
    return Router(registry, max_queue=8, stale_after_s=stale_after_s, retry_after_s=1)


async def _generate(tokenizer: Tokenizer, router: Router, params: GenerationParams, prompt: list[int]) -> Generation:
    gen = Generation(GenerationRequest("cmpl-x", "completions", prompt, params), router=router,
                     journal=JournalEntry(Journal(None, "p", 60), "cmpl-x"), tokenizer=tokenizer,
                     eos_token_ids=frozenset({2}), context_length=2048, max_replays=2, timeout_s=30,
                     metrics=GatewayMetrics("tiny"))
    gen.deltas = [d async for d in gen.stream()]  # type: ignore[attr-defined]
    return gen


def test_a_broken_stream_is_replayed_without_gap_or_duplicate(tokenizer: Tokenizer) -> None:
    prompt, out = tokenizer.encode("Tell me a story."), tokenizer.encode(STORY)
    k = 9
    first = Script(out[:k], fail=grpc.StatusCode.UNAVAILABLE)
    second = Script(out[k:], finish=inference_pb2.FINISH_REASON_LENGTH)
    router = _router({"a": first, "b": second})
    params = GenerationParams(max_tokens=len(out), temperature=0.8, seed=42, ignore_eos=True)
    gen = asyncio.run(_generate(tokenizer, router, params, prompt))
    assert gen.output_ids == out and gen.finish_reason is FinishReason.LENGTH and gen.replicas == ["a", "b"]
    assert "".join(d.text for d in gen.deltas) == tokenizer.decode(out)  # type: ignore[attr-defined]
    replay = second.requests[0]
    assert list(replay.token_ids.ids) == prompt + out[:k]
    assert replay.sampling.sample_index_offset == k and replay.sampling.max_tokens == len(out) - k
    assert replay.sampling.seed == 42 and replay.sampling.ignore_eos and replay.request_id == "cmpl-x.1"
    assert router.registry.replicas["a"].down  # a lost connection marks the replica down at once
    assert all(s.inflight == 0 for s in router.registry.replicas.values())


def test_a_stop_string_across_the_replay_point_is_found_by_the_gateway(tokenizer: Tokenizer) -> None:
    prompt, out = tokenizer.encode("Tell me a story."), tokenizer.encode(STORY)
    k = 9
    pieces = [tokenizer.decode(out[: i + 1]) for i in range(len(out))]
    stop = pieces[k][len(pieces[k - 2]) - 2:]  # the end of token k-2 .. token k: spans the replay point
    assert stop.strip() and stop not in pieces[k - 1]
    first = Script(out[:k], fail=grpc.StatusCode.UNAVAILABLE)
    second = Script(out[k:], finish=inference_pb2.FINISH_REASON_LENGTH)  # its own window never sees the stop
    params = GenerationParams(max_tokens=len(out), stop=(stop,))
    gen = asyncio.run(_generate(tokenizer, _router({"a": first, "b": second}), params, prompt))
    full = tokenizer.decode(out)
    assert gen.finish_reason is FinishReason.STOP and gen.output_ids == out[: k + 1]
    assert "".join(d.text for d in gen.deltas) == full[: full.index(stop)]  # type: ignore[attr-defined]
    assert second.calls[0].cancelled  # the gateway stopped the agent


def test_a_stalled_stream_on_a_replica_gone_stale_is_replayed(tokenizer: Tokenizer) -> None:
    out = tokenizer.encode(STORY)
    first = Script(out[:5], hang=True)  # the connection stays open but nothing more comes
    second = Script(out[5:], finish=inference_pb2.FINISH_REASON_LENGTH)
    router = _router({"a": first, "b": second}, stale_after_s=0.05)

    async def scenario() -> Generation:
        async def hide_a() -> None:  # while a's stream hangs, its pressure stream breaks too
            await asyncio.sleep(0.02)
            router.registry.replicas["a"].mark_down("pressure stream lost")
        task = asyncio.create_task(hide_a())
        gen = await _generate(tokenizer, router, GenerationParams(max_tokens=len(out)), [5, 6])
        await task
        return gen

    gen = asyncio.run(scenario())
    assert gen.output_ids == out and gen.replicas == ["a", "b"] and first.calls[0].cancelled


def test_replays_are_bounded(tokenizer: Tokenizer) -> None:
    from kunserve.gateway.errors import ServiceUnavailableError

    out = tokenizer.encode(STORY)
    scripts = {rid: Script(out[:2], fail=grpc.StatusCode.UNAVAILABLE) for rid in ("a", "b", "c", "d")}
    with pytest.raises(ServiceUnavailableError):
        asyncio.run(_generate(tokenizer, _router(scripts), GenerationParams(max_tokens=50), [5, 6]))
    assert sum(len(s.requests) for s in scripts.values()) == 3  # the first try and max_replays = 2 replays


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_stop_strings_cut_the_text_where_they_first_appear(tiny_dir: Path, data: st.DataObject) -> None:
    """The engine's request text (the TextAssembler the gateway also uses across replays) streams the plain
    detokenized text cut right before the first stop string, and finishes with STOP exactly when one appears."""
    tok = Tokenizer(tiny_dir)
    ids = data.draw(st.lists(st.integers(3, 2047), min_size=1, max_size=40))
    prompt = [5, 6, 7]
    plain_asm = TextAssembler(tok, prompt, (), frozenset())
    plain = "".join(plain_asm.add(t).text for t in ids) + plain_asm.finish()
    stops: tuple[str, ...] = ()
    if plain and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(plain) - 1))
        stops = (plain[i: i + data.draw(st.integers(1, 6))],)
    engine = RequestState(Sequence("r", prompt, SamplingParams(max_tokens=len(ids), stop=stops, ignore_eos=True)),
                          tok, frozenset())
    streamed = ""
    for t in ids:
        engine.seq.append_token(t)
        out = engine.on_token(t, 10_000)
        streamed += out.new_text
        if out.finished:
            break
    assert out.finished
    cut = min((i for s in stops if (i := plain.find(s)) >= 0), default=None)
    assert (out.finish_reason is EngineFinish.STOP) == (cut is not None)
    assert streamed == (plain if cut is None else plain[:cut]) == out.text
