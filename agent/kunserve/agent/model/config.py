"""Llama-family model configuration read from a checkpoint's config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kunserve.agent.errors import CheckpointError

_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})


@dataclass(slots=True, frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (rope_type "llama3"); "default" means none."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(slots=True, frozen=True)
class ModelConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    model_type: str = "llama"

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: Path | str = "config.json") -> ModelConfig:
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise CheckpointError(source, f"missing required keys {missing}")
        model_type = str(raw.get("model_type", "llama"))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(source, f"model_type {model_type!r} is not a Llama-family model")
        heads = int(raw["num_attention_heads"])
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        hidden = int(raw["hidden_size"])
        head_dim = int(raw.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise CheckpointError(source, f"num_attention_heads {heads} is not a multiple of {kv_heads}")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        scaling = _rope_scaling(raw.get("rope_scaling") or raw.get("rope_parameters"), source)
        theta = raw.get("rope_theta")
        if theta is None and isinstance(raw.get("rope_parameters"), dict):
            theta = raw["rope_parameters"].get("rope_theta")
        return cls(
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=int(raw["vocab_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta if theta is not None else 10000.0),
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
            bos_token_id=None if raw.get("bos_token_id") is None else int(raw["bos_token_id"]),
            eos_token_ids=eos_ids,
            model_type=model_type,
        )

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        if not path.is_file():
            raise CheckpointError(path, "file not found (a checkpoint directory needs config.json)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(path, f"not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(path, "expected a JSON object")
        return cls.from_dict(raw, path)


def _rope_scaling(raw: Any, source: Path | str) -> RopeScaling:
    if not isinstance(raw, dict):
        return RopeScaling()
    rope_type = str(raw.get("rope_type", raw.get("type", "default")))
    if rope_type == "default":
        return RopeScaling()
    if rope_type != "llama3":
        raise CheckpointError(source, f"rope scaling type {rope_type!r} is not supported (default, llama3)")
    return RopeScaling(
        rope_type="llama3",
        factor=float(raw["factor"]),
        low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
        high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
    )
