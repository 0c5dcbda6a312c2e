"""OpenAI response objects: whole completions and SSE chunks, for /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import json
from typing import Any

from kunserve.gateway.generation import Delta
from kunserve.gateway.validate import Endpoint, Prepared

DONE = b"data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _head(p: Prepared, object_: str) -> dict[str, Any]:
    return {"id": p.request.request_id, "object": object_, "created": p.created, "model": p.model}


def full_response(p: Prepared, text: str, token_ids: list[int], finish_reason: str | None) -> dict[str, Any]:
    """The non-streaming body."""
    n_prompt = len(p.request.prompt_ids)
    if p.endpoint is Endpoint.COMPLETIONS:
        choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        body = _head(p, "text_completion")
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        body = _head(p, "chat.completion")
    if p.return_token_ids:
        choice["token_ids"] = token_ids
        body["prompt_token_ids"] = p.request.prompt_ids
    body["choices"] = [choice]
    body["usage"] = usage(n_prompt, len(token_ids))
    return body


def first_chunk(p: Prepared) -> bytes | None:
    """Chat streams open with the assistant role (as OpenAI's); completions have no opening chunk."""
    if p.endpoint is not Endpoint.CHAT:
        return None
    return _chunk(p, {"role": "assistant", "content": ""}, None, None)


def delta_chunk(p: Prepared, delta: Delta) -> bytes | None:
    """One chunk for a delta (None when it carries nothing to show)."""
    finish = delta.finish_reason.value if delta.finish_reason is not None else None
    if not delta.text and finish is None and not (p.return_token_ids and delta.token_ids):
        return None
    ids = delta.token_ids if p.return_token_ids else None
    if p.endpoint is Endpoint.CHAT:
        return _chunk(p, {"content": delta.text} if delta.text or finish is None else {}, finish, ids)
    return _chunk(p, delta.text, finish, ids)


def usage_chunk(p: Prepared, completion_tokens: int) -> bytes:
    object_ = "text_completion" if p.endpoint is Endpoint.COMPLETIONS else "chat.completion.chunk"
    return sse({**_head(p, object_), "choices": [], "usage": usage(len(p.request.prompt_ids), completion_tokens)})


def _chunk(p: Prepared, content: Any, finish: str | None, ids: list[int] | None) -> bytes:
    if p.endpoint is Endpoint.CHAT:
        choice: dict[str, Any] = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
        body = _head(p, "chat.completion.chunk")
    else:
        choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
        body = _head(p, "text_completion")
    if ids is not None:
        choice["token_ids"] = ids
    body["choices"] = [choice]
    if p.include_usage:
        body["usage"] = None
    return sse(body)
