"""Where restored weights come from: the local checkpoint (the host copy) or a peer that holds them.

Names are the engine's state-dict names ("layers.3.qkv_proj.weight", "embed_tokens.weight",
"norm.weight", "lm_head.weight"); each source maps them to its own storage.
"""

from __future__ import annotations

import re
from typing import Protocol

import torch

from kunserve.agent.errors import CheckpointError
from kunserve.agent.model.loader import Checkpoint

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


class WeightSource(Protocol):
    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors (any device); raises KunServeError if one is missing."""
        ...


class CheckpointSource:
    """Weights read from the checkpoint files (only the requested tensors are touched)."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        ckpt, out = self.checkpoint, {}
        layers: dict[int, dict[str, torch.Tensor]] = {}
        for name in names:
            m = _LAYER.match(name)
            if m:
                i = int(m.group(1))
                if i not in layers:
                    layers[i] = ckpt.read_layer(i)
                if m.group(2) not in layers[i]:
                    raise CheckpointError(ckpt.dir, f"no tensor for {name}")
                out[name] = layers[i][m.group(2)]
                continue
            file_name = {
                "embed_tokens.weight": "model.embed_tokens.weight",
                "norm.weight": "model.norm.weight",
                "lm_head.weight": "model.embed_tokens.weight" if ckpt.config.tie_word_embeddings else "lm_head.weight",
            }.get(name)
            if file_name is None:
                raise CheckpointError(ckpt.dir, f"unknown weight name {name!r}")
            out[name] = ckpt.read([file_name])[file_name]
        return out
