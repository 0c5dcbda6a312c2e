"""kmock's KubernetesEmulator made good enough for kopf, served over real HTTP on loopback.

kmock 0.8 keeps objects as plain JSON and merges patches; a real API server does more, and kopf (and the
operator) rely on some of it. `Emulator` adds, for test use only:

- `metadata.uid`, `creationTimestamp`, `generation` (1) and `namespace` on create, `generateName`
  resolved to a unique name (kopf posts its Events that way);
- a fresh `metadata.resourceVersion` on create and on every patch (kopf's finalizer JSON patch tests it),
  and the optimistic-concurrency check of a merge patch that carries `metadata.resourceVersion` (409);
- `generation` bumped when a patch changes `spec`;
- the status subresource: a patch of `.../status` changes only `status`, a patch of the object itself
  leaves `status` alone (for resources declared with the `status` subresource);
- `kind` / `apiVersion` on lists and their items;
- server-side apply creating a missing object (an apply patch of an existing one is merged like a merge
  patch: fields the applier dropped are not removed);
- watches that start from the given resourceVersion instead of replaying every object as ADDED.

Not emulated (kmock gaps, see ENVIRONMENT.md): PUT, label/field selectors, garbage collection of owned
objects, field ownership, defaulting, schema validation and CEL.

`EmulatorThread` runs one in its own thread and event loop, so sync tests and kopf's own thread can both
talk to it over HTTP.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
from kmock._internal import rendering

# plural path ("group/version/plural", core group as "v1/plural") -> (kind, namespaced, subresources)
RESOURCES: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "kunserve.io/v1alpha1/servingpools": ("ServingPool", True, ("status", "scale")),
    "kunserve.io/v1alpha1/reconfigurations": ("Reconfiguration", True, ("status",)),
    "apps/v1/statefulsets": ("StatefulSet", True, ("status", "scale")),
    "apps/v1/deployments": ("Deployment", True, ("status", "scale")),
    "v1/services": ("Service", True, ("status",)),
    "v1/secrets": ("Secret", True, ()),
    "v1/events": ("Event", True, ()),
    "v1/namespaces": ("Namespace", False, ("status",)),
}
VERBS = ("create", "delete", "get", "list", "patch", "watch")


def _api_version(resource: kmock.resource) -> str:
    return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)


class Emulator(kmock.KubernetesEmulator):
    """The stamping, status-splitting, list-typing subclass described in the module docstring."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._versions = itertools.count(1000)
        self._last_version = 999
        self._names = itertools.count(1)
        self._mutations = asyncio.Lock()
        self._kinds: dict[kmock.resource, str] = {}
        self._with_status: set[kmock.resource] = set()
        for path, (kind, namespaced, subresources) in RESOURCES.items():
            self.resources[path] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, verbs=set(VERBS), subresources=set(subresources),
                singular=kind.lower())
        for resource in self.resources:
            info = self.resources[resource]
            assert isinstance(info, kmock.ResourceInfo)
            self._kinds[resource] = str(info.kind)
            if "status" in info.subresources:
                self._with_status.add(resource)

    # ------------------------------------------------------------------------------------- mutations

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None or request.action not in (kmock.action.CREATE, kmock.action.UPDATE):
            return await super()._handle(request)
        async with self._mutations:  # stamp and apply atomically with respect to other writers
            if request.action == kmock.action.UPDATE and self._is_apply(request) and self._current(request) is None:
                # Server-side apply creates what does not exist yet. (kmock routes a request by its identity
                # in the handler's request log, so the log must hold the rewritten one.)
                original, request = request, attrs.evolve(request, action=kmock.action.CREATE)
                log = self._requests
                log[next(i for i in range(len(log) - 1, -1, -1) if log[i] is original)] = request
            try:
                if request.action == kmock.action.CREATE:
                    self._stamp_create(request)
                else:
                    self._stamp_update(request)
            except kmock.KubernetesError as exc:
                return await self._render_error(exc)
            return await super()._handle(request)

    @staticmethod
    def _is_apply(request: rendering.Request) -> bool:
        content_type = next((v for k, v in request.headers.items() if k.lower() == "content-type"), "")
        return content_type.split(";")[0].strip() == "application/apply-patch+yaml"

    def _next_version(self) -> str:
        self._last_version = next(self._versions)
        return str(self._last_version)

    def _stamp_create(self, request: rendering.Request) -> None:
        data = request.data
        if not isinstance(data, dict):
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="body must be an object")
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{next(self._names):05d}"
        if not meta.get("name"):
            raise kmock.KubernetesError(status=422, reason="Invalid", message="metadata.name is required")
        if request.namespace:
            meta["namespace"] = request.namespace
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_version(), generation=1,
                    creationTimestamp=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        for key in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(key, None)
        assert request.resource is not None
        data.setdefault("apiVersion", _api_version(request.resource))
        data.setdefault("kind", self._kinds.get(request.resource, ""))

    def _stamp_update(self, request: rendering.Request) -> None:
        assert request.resource is not None and request.name is not None
        current = self._current(request)
        if current is None:
            return  # kmock answers 404
        meta = current.get("metadata", {})
        version = self._next_version()
        splits_status = request.resource in self._with_status
        data = request.data
        if isinstance(data, list):  # JSON patch: kmock applies it as is; keep the stamps coming
            try:
                jsonpatch.apply_patch(current, data)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
                raise kmock.KubernetesError(status=422, reason="Invalid", message=f"JSON patch failed: {exc}") from exc
            touches_spec = any(str(op.get("path", "")).startswith("/spec") for op in data)
            data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
            if touches_spec:
                data.append({"op": "add", "path": "/metadata/generation", "value": meta.get("generation", 1) + 1})
            return
        if not isinstance(data, dict):
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="patch must be an object or list")
        precondition = (data.get("metadata") or {}).get("resourceVersion")
        if precondition is not None and precondition != meta.get("resourceVersion"):
            raise kmock.KubernetesError(
                status=409, reason="Conflict",
                message=f"the object has been modified (resourceVersion {precondition} is stale); "
                        "please apply your changes to the latest version and try again")
        if splits_status and request.subresource == "status":
            for key in [k for k in data if k not in ("status", "metadata")]:
                del data[key]
            data["metadata"] = {}
        elif splits_status and request.subresource is None:
            data.pop("status", None)
        new_meta = data.setdefault("metadata", {})
        new_meta["resourceVersion"] = version
        if "spec" in data and _merged(current.get("spec"), data["spec"]) != current.get("spec"):
            new_meta["generation"] = meta.get("generation", 1) + 1

    def _current(self, request: rendering.Request) -> dict[str, Any] | None:
        assert request.resource is not None and request.name is not None
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    # ------------------------------------------------------------------------------------- reading

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        payload = await super()._serve_list(request)
        assert isinstance(payload, dict) and request.resource is not None
        kind = self._kinds.get(request.resource, "")
        api_version = _api_version(request.resource)
        items = [{"apiVersion": api_version, "kind": kind, **item} for item in payload.get("items", [])]
        return {"apiVersion": api_version, "kind": f"{kind}List",
                "metadata": {"resourceVersion": str(self._last_version)}, "items": items}

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        """kmock replays every live object as ADDED when a watch starts; a real server sends only what
        changed after the watch's resourceVersion (kopf lists first, then watches from the list's)."""
        since = int(request.params.get("resourceVersion") or 0)
        replaying = True
        async for event in super()._serve_watch(request):
            if isinstance(event, dict) and replaying and event.get("type") == "ADDED":
                version = int(event.get("object", {}).get("metadata", {}).get("resourceVersion") or 0)
                if version <= since:
                    continue
            elif isinstance(event, dict):
                replaying = replaying and event.get("type") == "ADDED"
            yield event


def _merged(old: Any, patch: Any) -> Any:
    """JSON merge patch (RFC 7386) of old by patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(old) if isinstance(old, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merged(out.get(key), value)
    return out


class EmulatorThread:
    """An `Emulator` served on 127.0.0.1:<free port> from a thread of its own (context manager)."""

    def __init__(self, start_timeout_s: float = 10.0) -> None:
        self.url = ""
        self.emulator: Emulator | None = None
        self._start_timeout_s = start_timeout_s
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="kmock-emulator", daemon=True)

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        if not self._ready.wait(self._start_timeout_s) or self._error is not None:
            raise RuntimeError(f"the Kubernetes emulator did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to __enter__
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with Emulator() as emulator, kmock.Server(emulator) as server:
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()
