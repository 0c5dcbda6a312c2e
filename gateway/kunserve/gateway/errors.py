"""Typed errors raised at the gateway's edges, each knowing its HTTP status and OpenAI-shaped body."""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """Base class: an error the client sees as {"error": {"message", "type", "param", "code"}}."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequestError(GatewayError):
    """Bad input: 400, naming the parameter."""

    status = 400
    type = "invalid_request_error"


class AuthenticationError(GatewayError):
    status = 401
    type = "invalid_request_error"

    def __init__(self, message: str = "invalid or missing API key (send Authorization: Bearer <key>)") -> None:
        super().__init__(message, code="invalid_api_key")

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class ModelNotFoundError(GatewayError):
    status = 404
    type = "invalid_request_error"

    def __init__(self, model: str) -> None:
        super().__init__(f"the model {model!r} does not exist", param="model", code="model_not_found")


class PayloadTooLargeError(GatewayError):
    status = 413
    type = "invalid_request_error"

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is larger than {limit} bytes", code="request_too_large")


class ServiceUnavailableError(GatewayError):
    """503 with Retry-After: nothing can take the request now (no replica, replays exhausted, journal down)."""

    status = 503
    type = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1, code: str = "no_replica_available") -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class RequestTimeoutError(GatewayError):
    status = 504
    type = "timeout"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the request did not finish within {timeout_s:g} s", code="timeout")


class UpstreamError(GatewayError):
    """An agent failed in a way replays cannot fix (a bug or a contract violation)."""

    status = 502
    type = "upstream_error"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
