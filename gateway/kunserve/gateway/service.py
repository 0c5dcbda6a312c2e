"""Serving one generation request: journal it, start it (waiting for its first token before answering, so
a request nothing can serve gets a real 503 / 400 instead of a broken 200 stream), then stream it as SSE
or collect it whole. Cleanup (agent call, journal entry, metrics) runs exactly once, shielded from the
cancellation a client disconnect causes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from kunserve.agent.model.tokenizer import Tokenizer
from kunserve.gateway import responses
from kunserve.gateway.config import GatewayConfig, ModelInfo
from kunserve.gateway.errors import GatewayError, ServiceUnavailableError, UpstreamError
from kunserve.gateway.generation import Delta, Generation
from kunserve.gateway.journal import Journal, JournalEntry, JournalRecord
from kunserve.gateway.metrics import GatewayMetrics
from kunserve.gateway.router import Router
from kunserve.gateway.validate import Prepared, RequestValidator

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Running:
    prepared: Prepared
    generation: Generation
    deltas: AsyncGenerator[Delta, None]
    entry: JournalEntry
    first: Delta
    accepted_at: float
    closed: bool = field(default=False)


class Gateway:
    def __init__(self, config: GatewayConfig, tokenizer: Tokenizer, info: ModelInfo, router: Router,
                 journal: Journal, metrics: GatewayMetrics) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.info = info
        self.router = router
        self.journal = journal
        self.metrics = metrics
        self.validator = RequestValidator(tokenizer, info, config)
        extra_eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.eos_token_ids = info.eos_token_ids | extra_eos  # as the engine: config.json's and the tokenizer's

    async def start(self, p: Prepared) -> Running:
        """Journal the request and wait for its first delta; raises GatewayError (nothing was sent)."""
        req = p.request
        accepted_at = time.monotonic()
        entry = await self.journal.record(JournalRecord(
            request_id=req.request_id, endpoint=req.endpoint, model=p.model, gateway=self.config.gateway_id,
            prompt_token_ids=req.prompt_ids, params=req.params.to_json()))
        self.metrics.in_flight.inc()
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        gen = Generation(req, router=self.router, journal=entry, tokenizer=self.tokenizer,
                         eos_token_ids=self.eos_token_ids, context_length=self.info.context_length,
                         max_replays=self.config.max_replays, timeout_s=self.config.request_timeout_s,
                         metrics=self.metrics)
        deltas = gen.stream()
        run = Running(p, gen, deltas, entry, Delta([], ""), accepted_at)
        try:
            run.first = await _next(deltas)
        except BaseException as exc:
            if isinstance(exc, ServiceUnavailableError) and exc.code == "no_replica_available":
                self.metrics.rejected.inc()
            await self.finish(run)
            raise
        self.metrics.ttft.labels(endpoint=req.endpoint).observe(time.monotonic() - accepted_at)
        return run

    async def sse(self, run: Running) -> AsyncIterator[bytes]:
        p = run.prepared
        try:
            opening = responses.first_chunk(p)
            if opening is not None:
                yield opening
            delta = run.first
            while True:
                chunk = responses.delta_chunk(p, delta)
                if chunk is not None:
                    yield chunk
                if delta.finish_reason is not None:
                    break
                delta = await _next(run.deltas)
            if p.include_usage:
                yield responses.usage_chunk(p, len(run.generation.output_ids))
        except GatewayError as exc:  # after the 200: the client gets an error event, then [DONE]
            self.metrics.stream_errors.labels(code=exc.code or exc.type).inc()
            log.warning("request %s: stream failed after %d tokens: %s", p.request.request_id,
                        len(run.generation.output_ids), exc.message)
            yield responses.sse(exc.body())
        finally:
            await self.finish(run)
        yield responses.DONE

    async def collect(self, run: Running) -> dict[str, Any]:
        p = run.prepared
        try:
            delta, parts = run.first, []
            while True:
                parts.append(delta.text)
                if delta.finish_reason is not None:
                    break
                delta = await _next(run.deltas)
            gen = run.generation
            return responses.full_response(p, "".join(parts), list(gen.output_ids), delta.finish_reason.value)
        finally:
            await self.finish(run)

    async def finish(self, run: Running) -> None:
        """Release everything the request holds; safe to call twice and under cancellation."""
        if run.closed:
            return
        run.closed = True
        with anyio.CancelScope(shield=True):
            try:
                await run.deltas.aclose()  # cancels the agent call if it is still open
            finally:
                await run.entry.close()
                self.metrics.in_flight.dec()
                self.metrics.generation_tokens.inc(len(run.generation.output_ids))
                self.metrics.e2e.labels(endpoint=run.prepared.request.endpoint).observe(
                    time.monotonic() - run.accepted_at)


async def _next(deltas: AsyncIterator[Delta]) -> Delta:
    try:
        return await deltas.__anext__()
    except StopAsyncIteration:
        raise UpstreamError("the generation ended without a finish reason") from None
