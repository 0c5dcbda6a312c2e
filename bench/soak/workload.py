"""The soak's clients: the official `openai` client against the gateway, a seeded mix of chat and completions,
streaming and not, short and long prompts, greedy and seeded sampling, and clients that hang up mid-stream.

Every request comes from a fixed catalog (`Template`), so its expected tokens are known (invariants.py
computes them once with the engine in-process). Each attempt is an `Outcome`; a request the gateway refused
with a retryable status (503 / 429) is tried again, as a client would, after a short backoff.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import openai

WORDS = ("river", "mountain", "lantern", "harbor", "copper", "meadow", "signal", "orchard", "thunder", "velvet",
         "compass", "garden", "silver", "winter", "candle", "market", "bridge", "falcon")


class Kind(StrEnum):
    CHAT = "chat"
    COMPLETIONS = "completions"


class Status(StrEnum):
    OK = "ok"
    DISCONNECTED = "disconnected"  # the client hung up on purpose
    RETRYABLE = "retryable"  # 503 / 429 the client saw (an error event in a stream included)
    FATAL = "fatal"  # anything else: an invariant violation


@dataclass(slots=True, frozen=True)
class Template:
    key: str
    kind: Kind
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                               "extra_body": {"ignore_eos": True, "return_token_ids": True}}
        if self.seed is not None:
            out["seed"] = self.seed
        return out


@dataclass(slots=True)
class Outcome:
    key: str
    stream: bool
    status: Status
    started: float
    seconds: float
    tokens: list[int] = field(default_factory=list)
    finishes: int = 0  # chunks (or choices) that carried a finish reason
    error: str = ""
    attempt: int = 0


def catalog(seed: int, size: int = 16) -> list[Template]:
    """size templates: both kinds, short (4-12 words) and long (120-260 words) prompts, greedy and seeded."""
    rng = random.Random(seed)
    out = []
    for i in range(size):
        long = i % 4 >= 2
        words = [rng.choice(WORDS) for _ in range(rng.randint(120, 260) if long else rng.randint(4, 12))]
        sampled = i % 2 == 1
        out.append(Template(key=f"t{i:02d}", kind=Kind.CHAT if i % 8 < 4 else Kind.COMPLETIONS,
                            prompt=" ".join(words), max_tokens=rng.randint(8, 48),
                            temperature=0.8 if sampled else 0.0, top_p=0.95 if sampled else 1.0,
                            seed=rng.randrange(1, 2**31) if sampled else None))
    return out


def _ids(obj: Any) -> list[int]:
    extra = getattr(obj, "model_extra", None) or {}
    ids = extra.get("token_ids")
    return list(ids) if isinstance(ids, list) else []


def run_one(client: openai.OpenAI, model: str, t: Template, stream: bool, hang_up_after: int | None) -> Outcome:
    started = time.time()
    out = Outcome(t.key, stream, Status.OK, started, 0.0)
    try:
        if t.kind is Kind.CHAT:
            call: Any = client.chat.completions.create(model=model, messages=[{"role": "user", "content": t.prompt}],
                                                       stream=stream, **t.body())
        else:
            call = client.completions.create(model=model, prompt=t.prompt, stream=stream, **t.body())
        if not stream:
            choice = call.choices[0]
            out.tokens, out.finishes = _ids(choice), int(choice.finish_reason is not None)
        else:
            chunks = 0
            with call:
                for chunk in call:
                    for choice in chunk.choices:
                        out.tokens += _ids(choice)
                        out.finishes += int(choice.finish_reason is not None)
                    chunks += 1
                    if hang_up_after is not None and chunks >= hang_up_after and not out.finishes:
                        out.status = Status.DISCONNECTED
                        break
    except openai.APIStatusError as exc:
        out.status = Status.RETRYABLE if exc.status_code in (429, 503) else Status.FATAL
        out.error = f"{exc.status_code}: {exc.message}"[:300]
    except openai.APIError as exc:  # an error event inside a 200 stream, a connection error, a timeout
        code = (exc.body or {}).get("code") if isinstance(exc.body, dict) else None
        retryable = code in ("no_replica_available", "replays_exhausted", "journal_unavailable")
        out.status = Status.RETRYABLE if retryable else Status.FATAL
        out.error = f"{type(exc).__name__} {code}: {exc.message}"[:300]
    out.seconds = time.time() - started
    return out


@dataclass(slots=True)
class Workload:
    base_url: str
    model: str
    templates: list[Template]
    seed: int
    clients: int = 3
    stream_share: float = 0.6
    hang_up_share: float = 0.15  # of the streams
    think_s: float = 0.05  # pause between a client's requests
    max_attempts: int = 4
    request_timeout_s: float = 120.0
    outcomes: list[Outcome] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        for i in range(self.clients):
            th = threading.Thread(target=self._client, args=(i,), name=f"client-{i}", daemon=True)
            th.start()
            self._threads.append(th)

    def stop(self, timeout: float = 180.0) -> bool:
        """Stop issuing requests; wait (bounded) for the ones in flight. True if every client finished."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for th in self._threads:
            th.join(max(deadline - time.monotonic(), 0.1))
        return not any(th.is_alive() for th in self._threads)

    def _client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        client = openai.OpenAI(base_url=self.base_url + "/v1", api_key="soak", max_retries=0,
                               timeout=self.request_timeout_s)
        while not self._stop.is_set():
            t = rng.choice(self.templates)
            stream = rng.random() < self.stream_share
            hang_up = rng.randint(1, 4) if stream and rng.random() < self.hang_up_share else None
            for attempt in range(self.max_attempts):
                out = run_one(client, self.model, t, stream, hang_up)
                out.attempt = attempt
                with self._lock:
                    self.outcomes.append(out)
                if out.status is not Status.RETRYABLE or self._stop.is_set():
                    break
                time.sleep(0.5 * (attempt + 1))
            self._stop.wait(self.think_s)
        client.close()
