"""A tiny synchronous Kubernetes API client for the tests (urllib, loopback, no credentials).

Paths are written as kubectl would resolve them: `("apps/v1", "statefulsets")`, `("v1", "services")`.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class Kubectl:
    def __init__(self, server: str, timeout_s: float = 5.0) -> None:
        self.server = server.rstrip("/")
        self.timeout_s = timeout_s

    @staticmethod
    def path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        parts = [base]
        if namespace is not None:
            parts.append(f"namespaces/{namespace}")
        parts.append(plural)
        if name is not None:
            parts.append(name)
        if subresource is not None:
            parts.append(subresource)
        return "/".join(parts)

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise ApiError(exc.code, exc.read().decode(errors="replace")) from None
        return json.loads(raw) if raw else None

    # ---------------------------------------------------------------------------------------- verbs

    def create(self, obj: dict[str, Any], namespace: str | None = None) -> Any:
        api_version, plural = obj["apiVersion"], _plural(obj["kind"])
        ns = namespace if namespace is not None else obj.get("metadata", {}).get("namespace")
        return self.request("POST", self.path(api_version, plural, ns), obj)

    def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> Any:
        return self.request("GET", self.path(api_version, plural, namespace, name))

    def get_or_none(self, api_version: str, plural: str, namespace: str | None, name: str) -> Any:
        try:
            return self.get(api_version, plural, namespace, name)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.request("GET", self.path(api_version, plural, namespace))["items"]
        return items

    def patch(self, api_version: str, plural: str, namespace: str | None, name: str, body: Any,
              subresource: str | None = None) -> Any:
        return self.request("PATCH", self.path(api_version, plural, namespace, name, subresource), body,
                            content_type="application/merge-patch+json")

    def delete(self, api_version: str, plural: str, namespace: str | None, name: str) -> Any:
        return self.request("DELETE", self.path(api_version, plural, namespace, name))


_PLURALS = {"ServingPool": "servingpools", "Reconfiguration": "reconfigurations", "Namespace": "namespaces",
            "Secret": "secrets", "Service": "services", "StatefulSet": "statefulsets", "Deployment": "deployments"}


def _plural(kind: str) -> str:
    return _PLURALS[kind]


def wait_for(probe: Callable[[], T | None], timeout_s: float = 15.0, interval_s: float = 0.05,
             what: str = "condition") -> T:
    """Poll probe until it returns something truthy (bounded); that value is returned."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last value: {last!r}")
