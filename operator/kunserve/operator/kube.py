"""The operator's Kubernetes API access: a small `KubeApi` protocol and its kopf-backed implementation.

`KopfKubeApi` sends its requests through kopf's own authenticated client, so the operator's writes use the
credentials kopf logged in with (service account, kubeconfig, or an @kopf.on.login handler), are
re-authenticated on 401 and retried on 5xx like kopf's. That client is not part of kopf's documented
interface: this module is the only place that touches it (pyproject pins kopf <1.46, and the operator
tests exercise every call), so a kopf upgrade is a one-file change.

Writes use server-side apply (PATCH application/apply-patch+yaml, field manager `kunserve-operator`,
force): the API server creates the object if needed and removes fields the operator stopped setting.
Everything else in the operator depends on `KubeApi` only, so tests can give it a fake.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import kopf
from kopf._cogs.clients import api as kopf_api
from kopf._cogs.clients import errors as kopf_errors

from kunserve.operator.naming import MANAGER
from kunserve.operator.pool_spec import API_VERSION, KIND, PLURAL

Body = dict[str, Any]
BodyList = list[Body]  # (an alias: `list` is also a method name below)


@dataclass(slots=True, frozen=True)
class ResourceKind:
    api_version: str  # "apps/v1", "v1", "kunserve.io/v1alpha1"
    plural: str

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        root = f"/api/{self.api_version}" if "/" not in self.api_version else f"/apis/{self.api_version}"
        parts = [root, "namespaces", _q(namespace), self.plural]
        if name is not None:
            parts.append(_q(name))
        if subresource is not None:
            parts.append(subresource)
        return "/".join(parts)


SERVINGPOOLS = ResourceKind(API_VERSION, PLURAL)
RECONFIGURATIONS = ResourceKind(API_VERSION, "reconfigurations")
STATEFULSETS = ResourceKind("apps/v1", "statefulsets")
DEPLOYMENTS = ResourceKind("apps/v1", "deployments")
SERVICES = ResourceKind("v1", "services")
KINDS: dict[tuple[str, str], ResourceKind] = {
    ("apps/v1", "StatefulSet"): STATEFULSETS,
    ("apps/v1", "Deployment"): DEPLOYMENTS,
    ("v1", "Service"): SERVICES,
    (API_VERSION, KIND): SERVINGPOOLS,
    (API_VERSION, "Reconfiguration"): RECONFIGURATIONS,
}


def kind_of(manifest: Mapping[str, Any]) -> ResourceKind:
    try:
        return KINDS[(manifest["apiVersion"], manifest["kind"])]
    except KeyError:
        raise ValueError(f"the operator does not manage {manifest.get('apiVersion')}/{manifest.get('kind')}") from None


def _q(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


class KubeApiError(Exception):
    """A request the API server refused (status is the HTTP status, 0 when no answer came)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


class NotFound(KubeApiError):
    pass


class Conflict(KubeApiError):
    """409: the object changed since it was read (or already exists)."""


class KubeApi(Protocol):
    async def get(self, kind: ResourceKind, namespace: str, name: str) -> Body | None: ...

    async def apply(self, manifest: Mapping[str, Any]) -> Body: ...

    async def patch(self, kind: ResourceKind, namespace: str, name: str, patch: Mapping[str, Any],
                    subresource: str | None = None) -> Body: ...

    async def delete(self, kind: ResourceKind, namespace: str, name: str) -> bool: ...

    async def list(self, kind: ResourceKind, namespace: str) -> BodyList: ...

    async def create(self, manifest: Mapping[str, Any]) -> Body: ...


class KopfKubeApi:
    """KubeApi over kopf's authenticated client; only usable inside the running operator's handlers."""

    def __init__(self, settings: kopf.OperatorSettings, logger: logging.Logger | None = None,
                 backoffs: tuple[float, ...] = (0.5, 1.0, 2.0)) -> None:
        self._settings = settings
        self._logger = logger or logging.getLogger("kunserve.operator.kube")
        self._backoffs = backoffs

    async def _request(self, method: str, url: str, payload: object = None,
                       content_type: str | None = None) -> Body:
        headers = {"Content-Type": content_type} if content_type else None
        try:
            response = await kopf_api.request(method, url, payload=payload, headers=headers, settings=self._settings,
                                              backoffs=self._backoffs, logger=self._logger)
            async with response:
                body: Body = await response.json()
                return body
        except kopf_errors.APIError as exc:
            message = exc.message or str(exc)
            error = NotFound if exc.status == 404 else Conflict if exc.status == 409 else KubeApiError
            raise error(exc.status, message) from exc

    async def get(self, kind: ResourceKind, namespace: str, name: str) -> Body | None:
        try:
            return await self._request("get", kind.path(namespace, name))
        except NotFound:
            return None

    async def apply(self, manifest: Mapping[str, Any]) -> Body:
        meta = manifest["metadata"]
        url = kind_of(manifest).path(meta["namespace"], meta["name"])
        query = urllib.parse.urlencode({"fieldManager": MANAGER, "force": "true"})
        return await self._request("patch", f"{url}?{query}", dict(manifest), "application/apply-patch+yaml")

    async def patch(self, kind: ResourceKind, namespace: str, name: str, patch: Mapping[str, Any],
                    subresource: str | None = None) -> Body:
        return await self._request("patch", kind.path(namespace, name, subresource), dict(patch),
                                   "application/merge-patch+json")

    async def list(self, kind: ResourceKind, namespace: str) -> BodyList:
        """Every object of kind in namespace."""
        items = (await self._request("get", kind.path(namespace))).get("items") or []
        return [item for item in items if isinstance(item, dict)]

    async def create(self, manifest: Mapping[str, Any]) -> Body:
        """POST a new object; Conflict when one of that name exists (unlike apply, never overwrites)."""
        meta = manifest["metadata"]
        return await self._request("post", kind_of(manifest).path(meta["namespace"]), dict(manifest))

    async def delete(self, kind: ResourceKind, namespace: str, name: str) -> bool:
        """Deletes (dependents in the background); False when it was already gone."""
        try:
            await self._request("delete", kind.path(namespace, name) + "?propagationPolicy=Background")
        except NotFound:
            return False
        return True
