"""The chaos schedule: seeded, drawn up front (Poisson arrivals per kind at the rates given), logged line by
line as it runs (JSON Lines), each event with what it did.

Kinds: `drop` (a random set of free agents, through the controller: the Redis request list `kunserve reconfigure`
uses, carried out by the operator's executor), `restore` (a random formed group), `kill-agent` (SIGKILL; half
the time a member of a group if there is one), `restart-redis` (SIGKILL redis-server), `restart-controller`
(SIGKILL the controller; half the time right after it was handed a drop or restore, so the kill lands in the
middle of the reconfiguration). The supervisor restarts whatever was killed.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO

import redis

from bench.soak.cluster import POOL, Cluster
from kunserve.operator.local_controller import reply_key, requests_key, state_key


class ChaosKind(StrEnum):
    DROP = "drop"
    RESTORE = "restore"
    KILL_AGENT = "kill-agent"
    RESTART_REDIS = "restart-redis"
    RESTART_CONTROLLER = "restart-controller"


@dataclass(slots=True, frozen=True)
class ChaosRates:
    """Events per minute of each kind."""

    drop: float = 3.0
    restore: float = 3.0
    kill_agent: float = 1.0
    restart_redis: float = 0.5
    restart_controller: float = 0.5

    def of(self, kind: ChaosKind) -> float:
        return float(getattr(self, kind.value.replace("-", "_")))


@dataclass(slots=True)
class ChaosEvent:
    at_s: float  # seconds after the chaos started
    kind: ChaosKind
    index: int
    done_at_s: float | None = None
    detail: str = ""
    ok: bool = True


def schedule(seed: int, duration_s: float, rates: ChaosRates, quiet_tail_s: float = 0.0) -> list[ChaosEvent]:
    """Poisson arrivals of every kind over [0, duration_s - quiet_tail_s), sorted; the same seed, the same list."""
    rng = random.Random(seed)
    events: list[tuple[float, ChaosKind]] = []
    end = max(duration_s - quiet_tail_s, 0.0)
    for kind in ChaosKind:
        rate = rates.of(kind) / 60.0
        t = rng.expovariate(rate) if rate > 0 else end
        while t < end:
            events.append((t, kind))
            t += rng.expovariate(rate)
    events.sort(key=lambda e: (e[0], e[1].value))
    return [ChaosEvent(round(t, 3), k, i) for i, (t, k) in enumerate(events)]


@dataclass(slots=True)
class Chaos:
    cluster: Cluster
    events: list[ChaosEvent]
    seed: int
    log_path: Path
    reply_timeout_s: float = 60.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 120.0) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _run(self) -> None:
        t0 = time.monotonic()
        with self.log_path.open("a") as log:
            for ev in self.events:
                if self._stop.wait(max(ev.at_s - (time.monotonic() - t0), 0)):
                    break
                rng = random.Random(self.seed * 7919 + ev.index)
                try:
                    ev.detail = self._apply(ev, rng)
                except Exception as exc:  # Redis down, a controller restarting: logged, the schedule goes on
                    ev.ok, ev.detail = False, f"{type(exc).__name__}: {exc}"
                ev.done_at_s = round(time.monotonic() - t0, 3)
                self.counts[ev.kind.value] = self.counts.get(ev.kind.value, 0) + 1
                self._log(log, ev)

    @staticmethod
    def _log(log: TextIO, ev: ChaosEvent) -> None:
        log.write(json.dumps({**asdict(ev), "kind": ev.kind.value}) + "\n")
        log.flush()

    # ---- the events ------------------------------------------------------------------------------------------
    def _state(self, r: redis.Redis) -> dict[str, Any]:
        raw = r.get(state_key(POOL))
        return json.loads(raw) if isinstance(raw, str) else {}

    def _request(self, r: redis.Redis, body: dict[str, Any], wait: bool = True) -> str:
        rid = uuid.uuid4().hex
        r.rpush(requests_key(POOL), json.dumps({**body, "id": rid}))
        if not wait:
            return "sent"
        got = r.blpop([reply_key(POOL, rid)], timeout=int(self.reply_timeout_s))
        if got is None:
            return "no reply (controller restarted?)"
        reply = json.loads(got[1])
        if "error" in reply:
            return f"refused: {reply['error']}"
        status = reply.get("status") or {}
        return f"{reply.get('name')}: {status.get('phase')} {status.get('message', '')}"[:400]

    def _reconfigure_body(self, r: redis.Redis, rng: random.Random, kind: ChaosKind) -> dict[str, Any] | None:
        state = self._state(r)
        groups = state.get("groups") or []
        if kind is ChaosKind.RESTORE:
            if not groups:
                return None
            return {"action": "Restore", "group": rng.choice(groups)["id"], "reason": "chaos restore"}
        grouped = {m for g in groups for m in g.get("members", [])}
        free = sorted(set(self.cluster.agent_ports) - grouped)
        if len(free) < 2:
            return None
        return {"action": "Drop", "members": rng.sample(free, 2), "reason": "chaos drop"}

    def _apply(self, ev: ChaosEvent, rng: random.Random) -> str:
        c = self.cluster
        if ev.kind in (ChaosKind.DROP, ChaosKind.RESTORE):
            r = c.redis_client()
            try:
                body = self._reconfigure_body(r, rng, ev.kind)
                if body is None:
                    return "skipped: nothing to " + ev.kind.value
                return f"{body} -> {self._request(r, body)}"
            finally:
                r.close()
        if ev.kind is ChaosKind.KILL_AGENT:
            r = c.redis_client()
            try:
                groups = self._state(r).get("groups") or []
            except redis.RedisError:
                groups = []
            finally:
                r.close()
            members = [m for g in groups for m in g.get("members", [])]
            victim = rng.choice(members) if members and rng.random() < 0.5 else rng.choice(sorted(c.agent_ports))
            return f"SIGKILL {victim} (pid {c.kill(victim)}; grouped: {victim in members})"
        if ev.kind is ChaosKind.RESTART_REDIS:
            return f"SIGKILL redis (pid {c.kill('redis')})"
        # restart-controller, half the time in the middle of a reconfiguration it was just handed
        mid = ""
        if rng.random() < 0.5:
            r = c.redis_client()
            try:
                body = self._reconfigure_body(r, rng, rng.choice([ChaosKind.DROP, ChaosKind.RESTORE]))
                if body is not None:
                    self._request(r, body, wait=False)
                    time.sleep(rng.uniform(0.0, 0.4))
                    mid = f" during {body}"
            finally:
                r.close()
        return f"SIGKILL controller (pid {c.kill('controller')}){mid}"
