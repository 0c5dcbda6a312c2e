"""What the engine hands back: per-request outputs (token and text deltas) and KV pressure."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kunserve.agent.engine.sequence import FinishReason, Sequence
from kunserve.agent.model.text import TextAssembler
from kunserve.agent.model.tokenizer import Tokenizer


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]  # tokens produced by this step
    new_text: str  # text those tokens completed (stop strings never appear in it)
    finish_reason: FinishReason | None  # None while the request runs
    prompt_token_ids: list[int]
    token_ids: list[int]  # every output token; filled only on the finishing output
    text: str  # every output character emitted so far
    ttft_s: float | None  # arrival -> first token

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class Pressure:
    """KV pressure of one engine. demand > 1 means the pool cannot hold what is asked of it."""

    blocks_needed: int  # by running + waiting requests (their tokens plus the next one)
    blocks_total: int
    blocks_free: int
    num_waiting: int
    num_running: int
    timestamp: float = field(default_factory=time.time)

    @property
    def demand(self) -> float:
        return self.blocks_needed / self.blocks_total if self.blocks_total else float("inf")


@dataclass(slots=True)
class RequestState:
    """Engine-side bookkeeping of one request: its text (detokenizer and stop rules) and finish reason."""

    seq: Sequence
    tokenizer: Tokenizer
    eos_token_ids: frozenset[int]
    assembler: TextAssembler = field(init=False)

    def __post_init__(self) -> None:
        p = self.seq.params
        hidden = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids)
        # Primed with every token so far, so an adopted request does not re-send text already streamed.
        self.assembler = TextAssembler(self.tokenizer, self.seq.token_ids, p.stop, hidden)

    def on_token(self, token: int, context_limit: int) -> RequestOutput:
        seq, p = self.seq, self.seq.params
        step = self.assembler.add(token)
        stop_token = (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids
        if step.stopped or stop_token:
            seq.finish_reason = FinishReason.STOP
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= context_limit:
            seq.finish_reason = FinishReason.LENGTH
        delta = step.text + (self.assembler.finish() if seq.finish_reason else "")
        return self.output([token], delta)

    def output(self, new_ids: list[int], delta: str) -> RequestOutput:
        seq = self.seq
        ttft = None if seq.first_token_time is None else seq.first_token_time - seq.arrival_time
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_ids,
            new_text=delta,
            finish_reason=seq.finish_reason,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=seq.output_token_ids if seq.finish_reason else [],
            text=self.assembler.text,
            ttft_s=ttft,
        )
