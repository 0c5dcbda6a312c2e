"""Tokenizer from a checkpoint's tokenizer.json (the `tokenizers` library), its chat template, and
incremental detokenization for streaming."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from kunserve.agent.errors import CheckpointError, InvalidRequestError


def _raise(message: str) -> None:
    raise TemplateError(message)


class Tokenizer:
    def __init__(self, model_dir: Path) -> None:
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(path, "file not found (the tokenizer must be in tokenizer.json)")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises plain Exception subclasses
            raise CheckpointError(path, f"cannot load tokenizer: {exc}") from exc
        self.config: dict[str, Any] = {}
        cfg_path = model_dir / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                self.config = json.loads(cfg_path.read_text())
            except json.JSONDecodeError as exc:
                raise CheckpointError(cfg_path, f"not valid JSON: {exc}") from exc
        self.chat_template: str | None = self.config.get("chat_template")
        jinja = model_dir / "chat_template.jinja"  # where newer HF tooling saves it
        if self.chat_template is None and jinja.is_file():
            self.chat_template = jinja.read_text()
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def encode_plain(self, text: str) -> list[int]:
        """Encode without the post-processor's special tokens (for text that is already templated)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the checkpoint's chat template (Jinja2, sandboxed)."""
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template (tokenizer_config.json chat_template)")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as exc:
            raise InvalidRequestError(f"chat template failed: {exc}") from exc

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode_plain(self.apply_chat_template(messages))


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<|im_end|>", ...} in older configs
        value = value.get("content")
    return value if isinstance(value, str) else None


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-emitting or splitting characters.

    Decodes a small window (prefix_offset..) and emits only what extends the text decoded up to
    read_offset, holding back output that ends in an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; returns the new text it completes (may be empty)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""
