"""Gateway settings and what the gateway reads from the checkpoint directory (no weights, no torch)."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from kunserve.gateway.topology import Topology
from kunserve.rpc.tls import TlsFiles

MiB = 1024 * 1024


@dataclass(slots=True)
class GatewayConfig:
    model_dir: Path
    pool: str = "default"
    model_name: str = ""  # default: the checkpoint directory's name
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: frozenset[str] = frozenset()
    static_topology: Topology | None = None
    max_body_bytes: int = 1 * MiB
    max_model_len: int | None = None  # default: the checkpoint's max_position_embeddings
    max_tokens_limit: int | None = None  # largest max_tokens accepted (default: the context length)
    default_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)
    max_queue: int = 16  # a replica whose waiting queue holds this many requests admits no more
    max_replays: int = 3  # re-submissions of one request after its agent stream broke
    request_timeout_s: float = 600.0
    pressure_interval_ms: int = 200
    stale_after_s: float = 2.0  # no pressure message for this long: the replica's pressure is unknown
    connect_timeout_s: float = 5.0
    journal_flush_tokens: int = 16
    journal_flush_interval_s: float = 0.25
    retry_after_s: int = 1
    gateway_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    tls: TlsFiles | None = None  # TLS (mutual with a client certificate) to the agents; None: plaintext

    def __post_init__(self) -> None:
        if not self.model_name:
            self.model_name = self.model_dir.name
        if self.max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        if self.max_replays < 0:
            raise ValueError("max_replays must be >= 0")

    @property
    def journal_ttl_s(self) -> int:
        """A journal entry outlives any request it can describe, then expires (crashed gateways)."""
        return int(self.request_timeout_s) + 60


class ModelInfoError(Exception):
    """The checkpoint directory lacks what the gateway needs (config.json, tokenizer.json)."""


@dataclass(slots=True, frozen=True)
class ModelInfo:
    context_length: int
    vocab_size: int
    eos_token_ids: frozenset[int]

    @classmethod
    def load(cls, model_dir: Path, max_model_len: int | None = None) -> ModelInfo:
        path = model_dir / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelInfoError(f"{path}: {exc}") from exc
        ctx = cfg.get("max_position_embeddings")
        vocab = cfg.get("vocab_size")
        if not isinstance(ctx, int) or not isinstance(vocab, int) or ctx <= 0 or vocab <= 0:
            raise ModelInfoError(f"{path}: max_position_embeddings and vocab_size must be positive integers")
        eos = cfg.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
        if max_model_len is not None:
            ctx = min(ctx, max_model_len)
        return cls(context_length=ctx, vocab_size=vocab, eos_token_ids=frozenset(int(i) for i in eos_ids))
