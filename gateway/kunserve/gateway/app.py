"""The FastAPI application: thin handlers over kunserve.gateway.service, lifespan wiring of Redis, the
topology, the agents' pressure streams, the router and the journal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from starlette.exceptions import HTTPException

from kunserve.agent.model.tokenizer import Tokenizer
from kunserve.gateway.auth import KeyChecker
from kunserve.gateway.config import GatewayConfig, ModelInfo
from kunserve.gateway.errors import GatewayError, InvalidRequestError, error_body
from kunserve.gateway.guard import GuardMiddleware, error_response_args
from kunserve.gateway.journal import Journal
from kunserve.gateway.metrics import GatewayMetrics
from kunserve.gateway.protocol import ChatCompletionRequest, CompletionRequest
from kunserve.gateway.replicas import Health, ReplicaRegistry
from kunserve.gateway.router import Router
from kunserve.gateway.service import Gateway
from kunserve.gateway.topology_source import RedisTopologyFollower

log = logging.getLogger(__name__)
_ERROR = {"description": "OpenAI-shaped error", "content": {"application/json": {"example": error_body(
    "explanation", "invalid_request_error", "param", None)}}}
_ERRORS: dict[int | str, dict[str, Any]] = {code: _ERROR for code in (400, 401, 404, 413, 503, 504)}
REDIS_TIMEOUT_S = 2.0
bearer = HTTPBearer(auto_error=False, description="API key (when the gateway has keys configured)")


def create_app(config: GatewayConfig) -> FastAPI:
    tokenizer = Tokenizer(config.model_dir)
    info = ModelInfo.load(config.model_dir, config.max_model_len)
    metrics = GatewayMetrics(config.model_name)
    registry = ReplicaRegistry(config.pressure_interval_ms, config.connect_timeout_s, config.tls)
    router = Router(registry, config.max_queue, config.stale_after_s, config.retry_after_s)
    metrics.topology_gauges(lambda: registry.topology.epoch, lambda: sum(
        r.health(config.stale_after_s) is Health.UP for r in registry.routable()))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Journal writes and topology reads time out; the subscription has its own connection without a
        # read timeout (it waits for events for as long as there are none).
        redis = Redis.from_url(config.redis_url, socket_timeout=REDIS_TIMEOUT_S,
                               socket_connect_timeout=REDIS_TIMEOUT_S) if config.redis_url else None
        events = Redis.from_url(config.redis_url, socket_connect_timeout=REDIS_TIMEOUT_S) if config.redis_url else None
        journal = Journal(redis, config.pool, config.journal_ttl_s, config.journal_flush_tokens,
                          config.journal_flush_interval_s)
        app.state.gateway = Gateway(config, tokenizer, info, router, journal, metrics)
        app.state.redis = redis
        tasks: list[asyncio.Task[None]] = []
        if config.static_topology is not None:
            registry.apply(config.static_topology)
        elif redis is not None and events is not None:
            follower = RedisTopologyFollower(redis, events, config.pool, registry.apply)
            tasks.append(asyncio.create_task(follower.run(), name="topology"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(follower.ready.wait(), config.connect_timeout_s)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await registry.close()
            for client in (redis, events):
                if client is not None:
                    await client.aclose()

    app = FastAPI(title="KunServe gateway", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions over KunServe agents.")
    app.state.registry = registry
    app.state.metrics = metrics
    app.add_middleware(GuardMiddleware, keys=KeyChecker(config.api_keys), max_body_bytes=config.max_body_bytes,
                       metrics=metrics)

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(**error_response_args(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # unknown routes, bad bodies
        type_ = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:  # a bug: still an OpenAI body
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal error", "internal_error"), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(**error_response_args(_as_invalid(exc)))

    @app.post("/v1/completions", responses=_ERRORS, dependencies=[Security(bearer)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        gw: Gateway = request.app.state.gateway
        return await _serve(gw, await gw.validator.completion(body))

    @app.post("/v1/chat/completions", responses=_ERRORS, dependencies=[Security(bearer)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        gw: Gateway = request.app.state.gateway
        return await _serve(gw, await gw.validator.chat(body))

    @app.get("/v1/models", dependencies=[Security(bearer)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "kunserve", "max_model_len": info.context_length}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        views = router.views()
        admitting = [v.id for v in views if v.health is not Health.DOWN and v.queue < router.max_queue]
        return {"status": "ok" if admitting else "no_replica_available", "epoch": registry.topology.epoch,
                "replicas": [{"id": v.id, "health": v.health.value, "demand": round(v.demand, 4),
                              "queue": v.queue, "inflight": v.inflight} for v in views]}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _serve(gw: Gateway, prepared: Any) -> Response:
    run = await gw.start(prepared)
    headers = {"x-request-id": prepared.request.request_id}
    if prepared.stream:
        return StreamingResponse(gw.sse(run), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})
    return JSONResponse(await gw.collect(run), headers=headers)


def _as_invalid(exc: RequestValidationError) -> InvalidRequestError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ())][1:]  # drop "body"
    if first.get("type") == "json_invalid":
        return InvalidRequestError(f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                                   code="invalid_json")
    if first.get("type") == "extra_forbidden":
        return InvalidRequestError(f"Unrecognized request argument supplied: {'.'.join(loc)}", param=".".join(loc),
                                   code="unrecognized_parameter")
    param = loc[0] if loc else None  # the top-level parameter; the message has the full path
    return InvalidRequestError(f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}", param=param)
