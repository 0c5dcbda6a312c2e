"""ASGI middleware in front of the API: request counting, API-key check and the body size limit.

It runs before FastAPI parses anything, so a request without a valid key is refused (401) before its
body is read, and a body over the limit (413) is never buffered whole: the declared Content-Length is
checked first, then the bytes as they arrive. The accepted body is handed to the app from memory.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kunserve.gateway.auth import KeyChecker
from kunserve.gateway.errors import AuthenticationError, GatewayError, PayloadTooLargeError
from kunserve.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/openapi.json")


class GuardMiddleware:
    def __init__(self, app: ASGIApp, *, keys: KeyChecker, max_body_bytes: int, metrics: GatewayMetrics) -> None:
        self.app = app
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        route = path if path in ROUTES else "other"
        status = {"code": 500, "started": False}

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            if path.startswith("/v1/"):
                headers = _headers(scope)
                if not self.keys.check(headers.get("authorization")):
                    raise AuthenticationError()
                receive = await self._buffer_body(headers, receive)
            await self.app(scope, receive, counting_send)
        except GatewayError as exc:
            if status["started"]:
                raise
            await send_error(counting_send, exc)
        finally:
            self.metrics.requests.labels(route=route, status=str(status["code"])).inc()

    async def _buffer_body(self, headers: dict[str, str], receive: Receive) -> Receive:
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise PayloadTooLargeError(self.max_body_bytes)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                return _replay([message], receive)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise PayloadTooLargeError(self.max_body_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def send_error(send: Send, exc: GatewayError) -> None:
    body = json.dumps(exc.body()).encode()
    headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers().items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def error_response_args(exc: GatewayError) -> dict[str, Any]:
    return {"status_code": exc.status, "content": exc.body(), "headers": exc.headers()}
