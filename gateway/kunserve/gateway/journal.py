"""The request journal in Redis: every accepted, unfinished request, so an accepted request is never lost
silently when a process dies.

Format: one hash per request at ``kunserve:journal:{pool}:{request_id}``::

    request_id        "cmpl-…"                       gateway        id of the gateway that accepted it
    endpoint          "completions" | "chat"          model          served model name
    created_at        unix seconds                    updated_at     unix seconds of the last write
    prompt_token_ids  JSON list of ints (after the chat template)
    params            JSON object (max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids,
                      ignore_eos) — the seed is always set for sampled requests, so a replay is exact
    output_token_ids  JSON list of the tokens streamed so far       num_output_tokens  len of that list
    replica           id of the agent serving it now                 attempt            0, then 1 per replay

The hash is written (HSET + EXPIRE in one transaction) before the response's first byte; the output is
rewritten at most every ``flush_tokens`` tokens or ``flush_interval_s`` seconds, whichever comes first,
and on every replay; the key is deleted when the request ends. Why batched: a per-token write would put
one Redis round trip (~0.1–0.3 ms on loopback, more across nodes) on every token of every stream, the
hottest path of the gateway; with 16 tokens per write the journal lags the client by at most 16 tokens or
250 ms, which a replay never needs (replays are driven by the gateway's own in-memory copy; the journal
is for recovery tooling and for seeing what a crashed gateway had accepted). Every key expires
``request_timeout + 60`` s after its last write, so entries of a crashed gateway disappear on their own.
A delete that fails (Redis down) is remembered and retried, in one DEL, after the next write Redis takes
(at most ``MAX_PENDING_DELETES`` ids are remembered; the rest only expire).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from kunserve.gateway.errors import ServiceUnavailableError

log = logging.getLogger(__name__)
JOURNAL_KEY = "kunserve:journal:{pool}:{request_id}"
MAX_PENDING_DELETES = 10_000


def journal_key(pool: str, request_id: str) -> str:
    return JOURNAL_KEY.format(pool=pool, request_id=request_id)


@dataclass(slots=True)
class JournalRecord:
    request_id: str
    endpoint: str
    model: str
    gateway: str
    prompt_token_ids: list[int]
    params: dict[str, Any]
    created_at: float = field(default_factory=time.time)

    def to_mapping(self) -> dict[str, str]:
        return {"request_id": self.request_id, "endpoint": self.endpoint, "model": self.model,
                "gateway": self.gateway, "created_at": repr(self.created_at), "updated_at": repr(self.created_at),
                "prompt_token_ids": json.dumps(self.prompt_token_ids), "params": json.dumps(self.params),
                "output_token_ids": "[]", "num_output_tokens": "0", "replica": "", "attempt": "0"}


class Journal:
    """Redis-backed journal; `redis=None` makes every call a no-op (no Redis configured)."""

    def __init__(self, redis: Redis | None, pool: str, ttl_s: int, flush_tokens: int = 16,
                 flush_interval_s: float = 0.25) -> None:
        self.redis = redis
        self.pool = pool
        self.ttl_s = ttl_s
        self.flush_tokens = flush_tokens
        self.flush_interval_s = flush_interval_s
        self.write_errors = 0
        self.pending_deletes: dict[str, None] = {}  # request ids whose delete failed, oldest first

    @property
    def enabled(self) -> bool:
        return self.redis is not None

    async def record(self, rec: JournalRecord) -> JournalEntry:
        """Write the entry; ServiceUnavailableError if Redis cannot take it (nothing is accepted unjournaled)."""
        entry = JournalEntry(self, rec.request_id)
        if self.redis is None:
            return entry
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                key = journal_key(self.pool, rec.request_id)
                pipe.hset(key, mapping=rec.to_mapping())  # type: ignore[arg-type]
                pipe.expire(key, self.ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.error("journal: cannot record %s: %s", rec.request_id, exc)
            raise ServiceUnavailableError("the request journal is unavailable", code="journal_unavailable") from exc
        await self._retry_deletes()
        return entry

    async def _write(self, request_id: str, fields: dict[str, str]) -> None:
        if self.redis is None:
            return
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                key = journal_key(self.pool, request_id)
                pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
                pipe.expire(key, self.ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:  # the stream goes on; the entry is only behind
            self.write_errors += 1
            log.warning("journal: cannot update %s: %s", request_id, exc)

    async def _delete(self, request_id: str) -> None:
        if self.redis is None:
            return
        try:
            await self.redis.delete(journal_key(self.pool, request_id))
        except (RedisError, OSError) as exc:  # retried after the next write Redis takes; it expires anyway
            self.write_errors += 1
            self.pending_deletes[request_id] = None
            if len(self.pending_deletes) > MAX_PENDING_DELETES:
                del self.pending_deletes[next(iter(self.pending_deletes))]
            log.warning("journal: cannot delete %s (will retry): %s", request_id, exc)

    async def _retry_deletes(self) -> None:
        """Delete the entries whose delete failed, now that Redis took a write."""
        if not self.pending_deletes or self.redis is None:
            return
        ids = list(self.pending_deletes)
        try:
            await self.redis.delete(*(journal_key(self.pool, i) for i in ids))
        except (RedisError, OSError) as exc:
            log.warning("journal: %d deletes still pending: %s", len(ids), exc)
            return
        for i in ids:
            self.pending_deletes.pop(i, None)
        log.info("journal: deleted %d entries whose delete had failed", len(ids))


@dataclass(slots=True)
class JournalEntry:
    """One request's entry: batches output updates (see the module docstring)."""

    journal: Journal
    request_id: str
    output_ids: list[int] = field(default_factory=list)
    replica: str = ""
    attempt: int = 0
    _flushed: int = 0
    _last_flush: float = field(default_factory=time.monotonic)
    closed: bool = False

    async def tokens(self, ids: list[int]) -> None:
        self.output_ids.extend(ids)
        pending = len(self.output_ids) - self._flushed
        if pending >= self.journal.flush_tokens or (
                pending and time.monotonic() - self._last_flush >= self.journal.flush_interval_s):
            await self.flush()

    async def moved(self, replica: str, attempt: int) -> None:
        """The request (re)starts on `replica`: always written at once."""
        self.replica, self.attempt = replica, attempt
        await self.flush()

    async def flush(self) -> None:
        if self.closed:
            return
        self._flushed, self._last_flush = len(self.output_ids), time.monotonic()
        await self.journal._write(self.request_id, {
            "output_token_ids": json.dumps(self.output_ids), "num_output_tokens": str(len(self.output_ids)),
            "replica": self.replica, "attempt": str(self.attempt), "updated_at": repr(time.time())})

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.journal._delete(self.request_id)


async def read_entries(redis: Redis, pool: str, limit: int = 10_000) -> dict[str, dict[str, str]]:
    """Every journal entry of a pool (for tools and tests): request_id -> fields, at most `limit`."""
    out: dict[str, dict[str, str]] = {}
    async for key in redis.scan_iter(match=journal_key(pool, "*"), count=500):
        if len(out) >= limit:
            break
        fields = await redis.hgetall(key)
        if fields:
            decoded = {_s(k): _s(v) for k, v in fields.items()}
            out[decoded.get("request_id", _s(key))] = decoded
    return out


def _s(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
