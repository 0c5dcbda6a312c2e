"""One request's generation across agents, with token replay.

The gateway keeps every token it has streamed. If the agent stream breaks (UNAVAILABLE, the connection
lost, the process died, an abort the gateway did not ask for, a stream that ends without a finish
reason), it re-submits prompt + those k tokens to another replica with max_tokens - k, the same seed and
sample_index_offset = k, and goes on from the next token: nothing is repeated (the replay starts after
the tokens already sent) and nothing is skipped (only tokens the gateway received count). Text comes from
the gateway's own detokenizer (kunserve.agent.model.text), so it continues exactly too. At most `max_replays`
re-submissions; then the request fails (503 before the first token, an error event after it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import grpc

from kunserve.agent.model.text import TextAssembler
from kunserve.agent.model.tokenizer import Tokenizer
from kunserve.gateway.errors import (
    InvalidRequestError,
    RequestTimeoutError,
    ServiceUnavailableError,
    UpstreamError,
)
from kunserve.gateway.journal import JournalEntry
from kunserve.gateway.metrics import GatewayMetrics
from kunserve.gateway.replicas import Health, ReplicaState
from kunserve.gateway.router import Router
from kunserve.rpc.v1 import inference_pb2

log = logging.getLogger(__name__)
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
CONNECTION_LOST = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"


@dataclass(slots=True, frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def to_proto(self, done: int) -> inference_pb2.SamplingParams:
        """Sampling for a (re)submission after `done` tokens were already streamed."""
        msg = inference_pb2.SamplingParams(
            max_tokens=self.max_tokens - done, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            stop=list(self.stop), stop_token_ids=list(self.stop_token_ids), ignore_eos=self.ignore_eos,
            sample_index_offset=done)
        if self.seed is not None:
            msg.seed = self.seed
        return msg

    def to_json(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "seed": self.seed, "stop": list(self.stop),
                "stop_token_ids": list(self.stop_token_ids), "ignore_eos": self.ignore_eos}


@dataclass(slots=True)
class GenerationRequest:
    request_id: str
    endpoint: str  # "completions" | "chat"
    prompt_ids: list[int]
    params: GenerationParams


@dataclass(slots=True)
class Delta:
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None


class _Retryable(Exception):
    """The agent stream broke in a way another replica can take over."""


class Generation:
    def __init__(self, req: GenerationRequest, *, router: Router, journal: JournalEntry, tokenizer: Tokenizer,
                 eos_token_ids: frozenset[int], context_length: int, max_replays: int, timeout_s: float,
                 metrics: GatewayMetrics) -> None:
        self.req = req
        self.router = router
        self.journal = journal
        self.context_length = context_length
        self.max_replays = max_replays
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.metrics = metrics
        p = req.params
        hidden = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else eos_token_ids)
        self.text = TextAssembler(tokenizer, req.prompt_ids, p.stop, hidden)
        self.output_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.attempt = 0
        self.replicas: list[str] = []  # every replica that served a part, in order

    async def stream(self) -> AsyncGenerator[Delta, None]:
        """Deltas until one carries the finish reason; raises a GatewayError if the request cannot go on."""
        failed: set[str] = set()
        while self.finish_reason is None:
            state = self._choose(frozenset(failed))
            self.replicas.append(state.spec.id)
            try:
                with self.router.lease(state, len(self.req.prompt_ids) + len(self.output_ids)):
                    await self.journal.moved(state.spec.id, self.attempt)
                    async for delta in self._run_on(state):
                        yield delta
            except _Retryable as exc:
                failed.add(state.spec.id)
                self.attempt += 1
                self.metrics.replays.labels(reason=str(exc).split(":")[0]).inc()
                if self.attempt > self.max_replays:
                    raise ServiceUnavailableError(f"request failed after {self.max_replays} replays: {exc}",
                                                  code="replays_exhausted") from exc
                log.warning("request %s: replica %s failed after %d tokens (%s); replaying (attempt %d)",
                            self.req.request_id, state.spec.id, len(self.output_ids), exc, self.attempt)
                await asyncio.sleep(min(0.05 * 2 ** (self.attempt - 1), 1.0))

    def _choose(self, failed: frozenset[str]) -> ReplicaState:
        try:
            return self.router.pick(exclude=failed)
        except ServiceUnavailableError:
            if not failed:
                raise
            return self.router.pick()  # a replica that failed this request but is up again

    async def _run_on(self, state: ReplicaState) -> AsyncGenerator[Delta, None]:
        done, p = len(self.output_ids), self.req.params
        prompt = self.req.prompt_ids + self.output_ids
        if done >= p.max_tokens or len(prompt) >= self.context_length:  # nothing left to generate
            self.finish_reason = FinishReason.LENGTH
            yield Delta([], self.text.finish(), self.finish_reason)
            return
        timeout = self.deadline - time.monotonic()
        if timeout <= 0:
            raise RequestTimeoutError(self.timeout_s)
        request = inference_pb2.GenerateRequest(
            request_id=f"{self.req.request_id}.{self.attempt}", token_ids=inference_pb2.TokenIds(ids=prompt),
            sampling=p.to_proto(done))
        call = state.inference.Generate(request, timeout=timeout)
        try:
            async for msg in self._read(state, call):
                delta, aborted = self._consume(msg)
                if delta is not None:
                    await self.journal.tokens(delta.token_ids)
                    yield delta
                if self.finish_reason is not None:
                    return
                if aborted:
                    raise _Retryable("aborted: the agent aborted the request")
            raise _Retryable("truncated: the stream ended without a finish reason")
        except grpc.aio.AioRpcError as exc:
            raise self._classify(state, exc, done) from exc
        finally:
            call.cancel()  # no-op when finished; aborts the request on the agent when we stop early

    async def _read(self, state: ReplicaState, call: Any) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """The call's messages. While none comes, the replica's health is checked every stale_after_s: a
        replica that went DOWN or STALE (a hung process, a partition the connection has not noticed) is
        given up on, so the request is replayed instead of waiting for its deadline."""
        patience = self.router.stale_after_s
        while True:
            read = asyncio.ensure_future(call.read())
            try:
                while not (await asyncio.wait({read}, timeout=patience))[0]:
                    if state.health(patience) in (Health.DOWN, Health.STALE):
                        raise _Retryable(f"stalled: no output and no pressure from {state.spec.id}")
                msg = read.result()
            finally:
                read.cancel()
            if msg is grpc.aio.EOF:
                return
            yield msg

    def _consume(self, msg: inference_pb2.GenerateResponse) -> tuple[Delta | None, bool]:
        tokens: list[int] = []
        pieces: list[str] = []
        for token in msg.token_ids:
            self.output_ids.append(token)
            tokens.append(token)
            step = self.text.add(token)
            pieces.append(step.text)
            if step.stopped:  # a stop string (possibly across a replay point): finished here
                self.finish_reason = FinishReason.STOP
                break
        aborted = msg.finish_reason == inference_pb2.FINISH_REASON_ABORT
        if self.finish_reason is None and not aborted and msg.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
            self.finish_reason = (FinishReason.LENGTH if msg.finish_reason == inference_pb2.FINISH_REASON_LENGTH
                                  else FinishReason.STOP)
            pieces.append(self.text.finish())
        if not tokens and self.finish_reason is None:
            return None, aborted
        return Delta(tokens, "".join(pieces), self.finish_reason), aborted

    def _classify(self, state: ReplicaState, exc: grpc.aio.AioRpcError, done: int) -> Exception:
        code, details = exc.code(), exc.details() or ""
        if code in RETRYABLE:
            if code in CONNECTION_LOST:
                state.mark_down(f"Generate: {code.name}: {details}")
            return _Retryable(f"{code.name.lower()}: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return RequestTimeoutError(self.timeout_s)
        if code == grpc.StatusCode.INVALID_ARGUMENT and done == 0:
            return InvalidRequestError(f"rejected by the model server: {details}")
        return UpstreamError(f"replica {state.spec.id} failed: {code.name}: {details}")
