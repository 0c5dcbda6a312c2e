"""Runs an LLMEngine on its own thread and lets other threads (the gRPC service's event loop) submit,
abort and follow requests. The engine is not thread-safe: only this thread touches it.

Commands (add, abort, call) go through a queue and are applied between steps; each request's outputs
are handed to the sink given at submission, called on the engine thread (a sink must be quick and
thread-safe, e.g. `loop.call_soon_threadsafe(queue.put_nowait, out)`). If the loop stops or the engine
dies, every open request's sink gets an EngineStoppedError instead, so no caller waits forever.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kunserve.agent.engine.llm_engine import LLMEngine
from kunserve.agent.engine.output import RequestOutput
from kunserve.agent.engine.sequence import SamplingParams
from kunserve.agent.errors import KunServeError
from kunserve.agent.group import GroupLeader, GroupLostError

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineStoppedError(KunServeError):
    """The engine loop is not running (not started, stopping, or died); retryable elsewhere."""


class GroupFailedError(EngineStoppedError):
    """The request's cooperative group lost a member; retryable on another replica."""


class HandedBack:
    """Sink item: the request left this agent's group pipeline and goes on at its owner (a group split)."""


HANDED_BACK = HandedBack()

# A sink receives RequestOutput from the engine, or (on a member relaying a request its group's leader
# computes) the leader's GenerateResponse messages as they are, HANDED_BACK, or an EngineStoppedError.
Sink = Callable[[object], object]


@dataclass(slots=True)
class _Tracked:
    sink: Sink
    last_token_time: float | None = None
    arrival: float = field(default_factory=time.monotonic)


class EngineLoop:
    def __init__(self, engine: LLMEngine, observer: Callable[[str, RequestOutput, float], None] | None = None,
                 idle_wait_s: float = 0.05) -> None:
        """observer(request_id, output, seconds since the previous output or arrival) sees every output
        on the engine thread (metrics)."""
        self.engine = engine
        self._observer = observer
        self._idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._tracked: dict[str, _Tracked] = {}
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._stopping = threading.Event()
        self.error: BaseException | None = None
        # What the loop steps: the engine (a replica), a GroupLeader (stage 0 of a group), or None (paused:
        # a later stage, or a reconfiguration in progress). Changed only on the engine thread.
        self.driver: LLMEngine | GroupLeader | None = engine
        self.on_group_lost: Callable[[GroupLostError], None] | None = None

    # ---- called from any thread ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def submit(self, prompt: str | list[int], params: SamplingParams, request_id: str, sink: Sink,
               owner: str = "") -> Future[str]:
        """Queue a request; the future fails with InvalidRequestError for bad input (EngineStoppedError
        while the agent is not serving on its own, e.g. a later stage of a group)."""

        def add() -> str:
            driver = self.driver
            if isinstance(driver, GroupLeader):
                rid = driver.add_request(prompt, params, request_id, owner)
            elif driver is None:
                raise EngineStoppedError("this agent is not taking requests right now (a stage of a group, or "
                                         "reconfiguring); send it to the group's leader")
            else:
                rid = driver.add_request(prompt, params, request_id)
            self._tracked[rid] = _Tracked(sink)
            return rid

        return self.call(add)

    def abort(self, request_id: str) -> Future[bool]:
        """Abort a request; its sink then gets a final ABORT output. True if it was running."""

        def run() -> bool:
            driver = self.driver
            if isinstance(driver, GroupLeader):
                return driver.abort(request_id)
            return self.engine.abort_request(request_id)

        return self.call(run)

    # ---- on the engine thread (inside call()) --------------------------------------------------------------
    def track(self, request_id: str, sink: Sink) -> None:
        """Deliver this request's outputs to sink (a request adopted or relayed rather than submitted)."""
        self._tracked[request_id] = _Tracked(sink)

    def untrack(self, request_id: str) -> Sink | None:
        tracked = self._tracked.pop(request_id, None)
        return None if tracked is None else tracked.sink

    def sink_of(self, request_id: str) -> Sink | None:
        tracked = self._tracked.get(request_id)
        return None if tracked is None else tracked.sink

    def fail_tracked(self, error: EngineStoppedError, request_ids: list[str] | None = None) -> int:
        """Fail these (default: every) followed requests with a retryable error; returns how many."""
        ids = list(self._tracked) if request_ids is None else [r for r in request_ids if r in self._tracked]
        for rid in ids:
            self._tracked.pop(rid).sink(type(error)(f"request {rid}: {error}"))
        return len(ids)

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run fn on the engine thread between steps; its result or exception lands in the future."""
        fut: Future[T] = Future()
        if not self.running:
            fut.set_exception(EngineStoppedError("the engine loop is not running"))
            return fut
        self._commands.put((fn, fut))
        self._wake.set()
        return fut

    # ---- the engine thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._drain_commands()
                driver = self.driver
                if driver is not None and driver.has_unfinished_requests():
                    try:
                        self._dispatch(driver.step())
                    except GroupLostError as exc:
                        self._group_lost(exc)
                else:
                    self._wake.wait(self._idle_wait_s)
                    self._wake.clear()
        except BaseException as exc:  # the engine died: fail every request so no caller hangs
            self.error = exc
            log.exception("engine loop died")
        finally:
            self._stopping.set()
            self._fail_pending()

    def _drain_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as exc:  # handed to the caller (e.g. InvalidRequestError), not raised here
                    fut.set_exception(exc)

    def _group_lost(self, exc: GroupLostError) -> None:
        log.error("%s", exc)
        self.driver = None
        self.fail_tracked(GroupFailedError(str(exc)))
        if self.on_group_lost is not None:
            self.on_group_lost(exc)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            if self._observer is not None:
                since = now - (tracked.last_token_time or tracked.arrival)
                self._observer(out.request_id, out, since)
            tracked.last_token_time = now
            if out.finished:
                del self._tracked[out.request_id]
            tracked.sink(out)

    def _fail_pending(self) -> None:
        while True:
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                break
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineStoppedError("the engine loop stopped"))
        for rid, tracked in list(self._tracked.items()):
            tracked.sink(EngineStoppedError(f"request {rid}: the engine stopped"))
        self._tracked.clear()
