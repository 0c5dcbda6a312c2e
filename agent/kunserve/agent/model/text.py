"""Client-visible text of one request, from its token ids: incremental detokenization plus the stop rules
(a stop string ends the text and is not returned; text that could be the start of a stop string is held
back until it cannot be; the text of a stop token, EOS or a stop_token_id, is never returned).

The engine uses it for every request; the gateway uses the same class to own a request's text across a
token replay (a replayed request starts a fresh detokenizer on the new agent, whose deltas would not
continue the first agent's text exactly). Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from kunserve.agent.model.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(slots=True)
class TextStep:
    text: str  # new client-visible text
    stopped: bool  # a stop string was found: the request is finished


class TextAssembler:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: tuple[str, ...],
                 stop_token_ids: frozenset[int]) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stop = stop
        self._stop_token_ids = stop_token_ids  # their text is never returned (EOS, stop_token_ids)
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._text = ""
        self._emitted = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything returned so far."""
        return self._text[: self._emitted]

    def add(self, token_id: int) -> TextStep:
        if self.stopped:
            return TextStep("", True)
        piece = self._detok.add(token_id)
        if token_id not in self._stop_token_ids:
            self._text += piece
        if self._stop and self._cut_at_stop():
            self.stopped = True
            return TextStep(self._flush(), True)
        end = max(self._emitted, len(self._text) - self._hold)
        delta = self._text[self._emitted : end]
        self._emitted = end
        return TextStep(delta, False)

    def finish(self) -> str:
        """The request ended: return the held-back text."""
        return self._flush()

    def _flush(self) -> str:
        delta = self._text[self._emitted :]
        self._emitted = len(self._text)
        return delta

    def _cut_at_stop(self) -> bool:
        window = max(0, self._emitted - self._hold - 1)
        hits = [i for s in self._stop if (i := self._text.find(s, window)) >= 0]
        if not hits:
            return False
        self._text = self._text[: min(hits)]
        self._emitted = min(self._emitted, len(self._text))
        return True
