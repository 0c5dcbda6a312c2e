"""From a parsed OpenAI request to a GenerationRequest: tokenization, limits, unsupported parameters.

Every refusal is an InvalidRequestError (400) naming the parameter, or ModelNotFoundError (404).
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kunserve.agent.errors import InvalidRequestError as TemplateRejected
from kunserve.agent.model.tokenizer import Tokenizer
from kunserve.gateway.config import GatewayConfig, ModelInfo
from kunserve.gateway.errors import InvalidRequestError, ModelNotFoundError
from kunserve.gateway.generation import GenerationParams, GenerationRequest
from kunserve.gateway.protocol import ChatCompletionRequest, CompletionRequest, _Sampling

GREEDY_BELOW = 1e-5  # temperatures below this are greedy (as vLLM): dividing logits by ~0 overflows
TOKENIZE_IN_THREAD_CHARS = 8192  # longer prompts are tokenized off the event loop


class Endpoint(StrEnum):
    COMPLETIONS = "completions"
    CHAT = "chat"


@dataclass(slots=True)
class Prepared:
    endpoint: Endpoint
    request: GenerationRequest
    stream: bool
    include_usage: bool
    return_token_ids: bool
    model: str
    created: int


class RequestValidator:
    def __init__(self, tokenizer: Tokenizer, info: ModelInfo, config: GatewayConfig) -> None:
        self.tokenizer = tokenizer
        self.info = info
        self.config = config
        self.max_tokens_limit = min(config.max_tokens_limit or info.context_length, info.context_length)

    async def completion(self, body: CompletionRequest) -> Prepared:
        self._common(body)
        _unsupported(body.best_of not in (None, 1), "best_of", "best_of > 1 is not supported")
        _unsupported(bool(body.echo), "echo", "echo is not supported")
        _unsupported(body.logprobs is not None, "logprobs", "logprobs is not supported")
        _unsupported(bool(body.suffix), "suffix", "suffix is not supported")
        prompt: Any = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise InvalidRequestError("a list of several prompts (a batch) is not supported; send one",
                                          param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = await self._encode(self.tokenizer.encode, _text(prompt, "prompt"))
        else:
            ids = [int(t) for t in prompt]
            if any(t >= self.info.vocab_size for t in ids):
                raise InvalidRequestError(f"prompt token ids must be in [0, {self.info.vocab_size})", param="prompt")
        return self._prepare(Endpoint.COMPLETIONS, body, ids, body.max_tokens, "prompt", self.config.default_max_tokens)

    async def chat(self, body: ChatCompletionRequest) -> Prepared:
        self._common(body)
        _unsupported(bool(body.logprobs) or body.top_logprobs is not None, "logprobs", "logprobs is not supported")
        _unsupported(bool(body.tools), "tools", "tools are not supported")
        _unsupported(body.tool_choice not in (None, "none"), "tool_choice", "tool_choice is not supported")
        _unsupported(bool(body.functions), "functions", "functions are not supported")
        _unsupported(body.function_call not in (None, "none"), "function_call", "function_call is not supported")
        _unsupported(body.response_format not in (None, {"type": "text"}), "response_format",
                     "response_format other than {'type': 'text'} is not supported")
        if body.max_tokens is not None and body.max_completion_tokens is not None \
                and body.max_tokens != body.max_completion_tokens:
            raise InvalidRequestError("max_tokens and max_completion_tokens differ", param="max_completion_tokens")
        messages = []
        for i, m in enumerate(body.messages):
            _unsupported(bool(m.tool_calls) or m.tool_call_id is not None, f"messages[{i}]",
                         "tool calls are not supported")
            if isinstance(m.content, list):
                bad = [p.type for p in m.content if p.type != "text" or p.text is None]
                _unsupported(bool(bad), f"messages[{i}].content", f"content parts of type {bad} are not supported")
                content = "".join(p.text or "" for p in m.content)
            else:
                content = m.content or ""
            messages.append({"role": m.role, "content": _text(content, f"messages[{i}].content")})
        try:
            ids = await self._encode(self.tokenizer.encode_chat, messages)
        except TemplateRejected as exc:
            raise InvalidRequestError(str(exc), param="messages") from exc
        max_tokens = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
        param = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
        return self._prepare(Endpoint.CHAT, body, ids, max_tokens, "messages", None, param)

    def _common(self, body: _Sampling) -> None:
        if body.model != self.config.model_name:
            raise ModelNotFoundError(body.model)
        _unsupported(body.n not in (None, 1), "n", "n > 1 is not supported (send n requests)")
        _unsupported(bool(body.presence_penalty), "presence_penalty", "presence_penalty is not supported")
        _unsupported(bool(body.frequency_penalty), "frequency_penalty", "frequency_penalty is not supported")
        _unsupported(bool(body.logit_bias), "logit_bias", "logit_bias is not supported")
        _unsupported(body.stream_options is not None and not body.stream, "stream_options",
                     "stream_options is only allowed with stream: true")
        for stop in [body.stop] if isinstance(body.stop, str) else body.stop or ():
            _text(stop, "stop")
        bad = [t for t in body.stop_token_ids or () if t >= self.info.vocab_size]
        if bad:
            raise InvalidRequestError(f"stop_token_ids must be in [0, {self.info.vocab_size}), got {bad[:4]}",
                                      param="stop_token_ids")

    async def _encode(self, fn: Any, arg: Any) -> list[int]:
        big = len(str(arg)) > TOKENIZE_IN_THREAD_CHARS
        ids: list[int] = await asyncio.to_thread(fn, arg) if big else fn(arg)
        return ids

    def _prepare(self, endpoint: Endpoint, body: _Sampling, ids: list[int], max_tokens: int | None,
                 prompt_param: str, default: int | None, max_param: str = "max_tokens") -> Prepared:
        ctx = self.info.context_length
        if not ids:
            raise InvalidRequestError("the prompt is empty", param=prompt_param)
        if len(ids) >= ctx:
            raise InvalidRequestError(f"this model's maximum context length is {ctx} tokens; the prompt has "
                                      f"{len(ids)} tokens", param=prompt_param, code="context_length_exceeded")
        room = min(ctx - len(ids), self.max_tokens_limit)
        if max_tokens is None:
            max_tokens = room if default is None else min(default, room)
        elif max_tokens > self.max_tokens_limit:
            raise InvalidRequestError(f"{max_param} must be <= {self.max_tokens_limit}, got {max_tokens}",
                                      param=max_param)
        elif len(ids) + max_tokens > ctx:
            raise InvalidRequestError(
                f"this model's maximum context length is {ctx} tokens; the prompt has {len(ids)} tokens and "
                f"{max_param} is {max_tokens}", param=max_param, code="context_length_exceeded")
        temperature = 1.0 if body.temperature is None else body.temperature
        temperature = 0.0 if temperature < GREEDY_BELOW else temperature
        seed = body.seed
        if seed is None and temperature > 0:
            seed = secrets.randbits(63)  # every sampled request is seeded, so a replay continues it exactly
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        top_k = body.top_k or 0
        params = GenerationParams(
            max_tokens=max_tokens, temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p,
            top_k=0 if top_k < 0 or top_k >= self.info.vocab_size else top_k, seed=seed, stop=stop,
            stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos)
        prefix = "cmpl" if endpoint is Endpoint.COMPLETIONS else "chatcmpl"
        rid = f"{prefix}-{uuid.uuid4().hex}"
        return Prepared(
            endpoint=endpoint, request=GenerationRequest(rid, endpoint.value, ids, params), stream=bool(body.stream),
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            return_token_ids=body.return_token_ids, model=self.config.model_name, created=int(time.time()))


def _text(value: str, param: str) -> str:
    """Strings go to the tokenizer and over gRPC as UTF-8: lone surrogates (valid JSON escapes) cannot."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(f"{param} is not valid Unicode text (lone surrogate)", param=param) from None
    return value


def _unsupported(condition: bool, param: str, message: str) -> None:
    if condition:
        raise InvalidRequestError(message, param=param, code="unsupported_parameter")
