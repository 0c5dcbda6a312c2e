"""Shared simulator types: policies, per-request records, the event context units report to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from kunserve.agent.engine.sequence import SamplingParams, Sequence


class SimError(RuntimeError):
    """The simulation cannot go on (the message says why: a stuck request, an inconsistent state)."""


class Policy(StrEnum):
    KUNSERVE = "kunserve"  # drop replicated layers via the operator's planner; cooperative pipeline
    VLLM = "vllm"  # queue + preemption by recompute
    SWAP = "swap"  # InferCept-like: preempted KV swapped to host over PCIe, pipelined with compute
    LLUMNIX = "llumnix"  # KV of running requests migrated to the least-loaded instance


@dataclass(slots=True)
class SimRequest:
    rid: str
    arrival: float
    prompt: int
    output: int  # tokens to generate
    seq: Sequence | None = None
    home: int = -1  # instance index it was routed to (its owner in a group)
    first_token: float | None = None
    finish: float | None = None
    last_token: float | None = None
    queue_s: float = 0.0  # waiting (not admitted) before the first token
    hop_s: float = 0.0  # pipeline hops + remote attention before the first token
    waiting_since: float | None = None
    preemptions: int = 0
    swaps: int = 0
    migrations: int = 0
    finished_count: int = 0  # must end at exactly 1

    def make_seq(self) -> Sequence:
        self.seq = Sequence(self.rid, [0] * self.prompt, SamplingParams(max_tokens=self.output, ignore_eos=True),
                            arrival_time=self.arrival)
        self.waiting_since = self.arrival
        return self.seq

    def admitted(self, now: float) -> None:
        if self.waiting_since is not None:
            if self.first_token is None:
                self.queue_s += now - self.waiting_since
            self.waiting_since = None

    def requeued(self, now: float) -> None:
        self.waiting_since = now
        self.preemptions += 1


class Context(Protocol):
    """What units need from the simulator."""

    now: float
    requests: dict[str, SimRequest]

    def push(self, at: float, fn: Callable[..., None], *args: Any) -> None: ...

    def token(self, req: SimRequest, now: float) -> bool:
        """Record one output token; True when the request is done (the caller frees it)."""
        ...

    def finished(self, req: SimRequest, now: float) -> None: ...

    def cpu_factor(self, units: int = 1) -> float:
        """How much slower a step of `units` instances runs because instances share CPU cores (1.0 on GPUs)."""
        ...


@dataclass(slots=True)
class StepShape:
    """What a batch costs: tokens computed, prefill attention pairs, context tokens the decodes read."""

    tokens: int = 0
    pairs: float = 0.0
    ctx: int = 0
    hidden_tokens: int = 0  # tokens whose hidden states travel a hop
    seqs: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence, n: int) -> None:
        start = seq.num_computed_tokens
        self.tokens += n
        self.hidden_tokens += n
        if n == 1 and start == seq.num_tokens - 1:
            self.ctx += start + 1
        else:
            self.pairs += n * (start + (n + 1) / 2)
        self.seqs.append(seq)
