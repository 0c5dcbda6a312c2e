"""OpenAI-compatible request bodies (pydantic; they are also the served OpenAPI schema).

Unknown fields are rejected (400 naming them), NaN and infinities are rejected, and parameters the
gateway knows but does not implement (n > 1, best_of, logprobs, tools, penalties, ...) are declared so the
schema documents them and the validation can reject them by name. vLLM-style extensions: top_k,
ignore_eos, stop_token_ids, return_token_ids.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

INT32_MAX = 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
StopString = Annotated[str, Field(min_length=1, max_length=1024)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = Field(False, description="Send a last chunk with the usage (and choices []).")


class _Sampling(_Body):
    model: str = Field(description="The served model's name (GET /v1/models).")
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX, description="Tokens to generate at most.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy; default 1.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX, description="Extension; 0 or -1 is off.")
    seed: int | None = Field(None, ge=0, le=2**64 - 1, description="Same seed, same tokens (even across replays).")
    stop: StopString | Annotated[list[StopString], Field(max_length=16)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=128, description="Only 1 is supported.")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Only 0 is supported.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported (must be empty).")
    user: str | None = Field(None, max_length=256, description="Accepted and ignored.")
    ignore_eos: bool = Field(False, description="Extension: do not stop at the EOS token.")
    stop_token_ids: list[TokenId] | None = Field(None, max_length=256, description="Extension.")
    return_token_ids: bool = Field(False, description="Extension: add token_ids to each choice / chunk.")


class CompletionRequest(_Sampling):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]] = Field(
        description="Text or token ids; a list of one prompt is accepted, batches are not.")
    best_of: int | None = Field(None, ge=1, le=128, description="Only 1 is supported.")
    echo: bool | None = Field(None, description="Not supported.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Not supported.")
    suffix: str | None = Field(None, description="Not supported.")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[Any] | None = Field(None, description="Not supported.")
    tool_call_id: str | None = Field(None, description="Not supported.")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX, description="Alias of max_tokens.")
    logprobs: bool | None = Field(None, description="Not supported.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Not supported.")
    tools: list[Any] | None = Field(None, description="Not supported.")
    tool_choice: str | dict[str, Any] | None = Field(None, description="Only 'none' is supported.")
    functions: list[Any] | None = Field(None, description="Not supported.")
    function_call: str | dict[str, Any] | None = Field(None, description="Only 'none' is supported.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted and ignored.")
    response_format: dict[str, Any] | None = Field(None, description="Only {'type': 'text'} is supported.")
