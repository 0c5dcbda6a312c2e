"""What the engine hands back: per-request outputs (token and text deltas) and KV pressure."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kunserve.agent.engine.sequence import FinishReason, Sequence
from kunserve.agent.model.tokenizer import IncrementalDetokenizer, Tokenizer


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
    """Engine-side bookkeeping of one request: detokenizer and stop-string hold-back."""

    seq: Sequence
    tokenizer: Tokenizer
    detok: IncrementalDetokenizer = field(init=False)
    text: str = ""  # decoded output, possibly holding back a partial stop string
    emitted: int = 0  # characters of `text` already returned

    def __post_init__(self) -> None:
        # Seeded with every token so far, so an adopted request does not re-send text already streamed.
        self.detok = IncrementalDetokenizer(self.tokenizer, self.seq.token_ids)

    def on_token(self, token: int, eos_ids: frozenset[int], context_limit: int) -> RequestOutput:
        seq, p = self.seq, self.seq.params
        delta = self.detok.add(token)
        stop_token = (not p.ignore_eos and token in eos_ids) or token in p.stop_token_ids
        if not stop_token:  # the text of a stop token (eos or a stop_token_id) is not returned
            self.text += delta
        # The stop-string cut runs first so a stop string never survives a stop token that also ends the text.
        cut = bool(p.stop) and self._cut_at_stop()
        if cut or stop_token:
            seq.finish_reason = FinishReason.STOP
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= context_limit:
            seq.finish_reason = FinishReason.LENGTH
        hold = 0 if seq.finish_reason or not p.stop else max(len(s) for s in p.stop) - 1
        end = max(self.emitted, len(self.text) - hold)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return self.output([token], delta)

    def _cut_at_stop(self) -> bool:
        longest = max(len(s) for s in self.seq.params.stop)
        window_start = max(0, self.emitted - longest)
        hits = [i for s in self.seq.params.stop if (i := self.text.find(s, window_start)) >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

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
            text=self.text[: self.emitted],
            ttft_s=ttft,
        )
