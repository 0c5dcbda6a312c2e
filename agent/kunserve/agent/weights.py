"""Where restored weights come from: the local checkpoint (the host copy, `Checkpoint`) or a peer that
holds them (`peer.PeerWeightSource`). Names are the engine's state-dict names ("layers.3.qkv_proj.weight",
"embed_tokens.weight", "norm.weight", "lm_head.weight"); each source maps them to its own storage.
"""

from __future__ import annotations

from typing import Protocol

import torch


class WeightSource(Protocol):
    def read_weights(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors (any device); raises KunServeError if one is missing."""
        ...
