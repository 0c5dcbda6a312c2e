"""Layer store: drop decoder layers to grow the KV pool, and restore them.

Drop keeps the layer range [start, end) a stage holds, frees every other layer's weights (and the
embedding unless the range starts at 0, the final norm and LM head unless it ends at L) and grows the KV
pool by exactly the freed bytes, rounded down to whole blocks of the new geometry (blocks now hold fewer
layers, so each is smaller). Live blocks do not move: existing segments keep their slabs, including
those of dropped layers, whose KV stays readable until it has been moved to the layer's new owner.

Restore gives back the blocks the drop added (they must be free), then reloads the missing weights from
the local checkpoint (the host copy), so the engine holds every layer again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kunserve.agent.engine.llm_engine import LLMEngine
from kunserve.agent.errors import KunServeError, PoolError
from kunserve.agent.model.llama import DecoderLayer, RMSNorm, _linear, empty_embedding
from kunserve.agent.model.loader import copy_weights, weight_bytes
from kunserve.agent.weights import WeightSource


class LayerStoreError(KunServeError):
    """A drop or restore that cannot be carried out (nothing changed)."""


@dataclass(slots=True, frozen=True)
class DropResult:
    kept: tuple[int, int]  # [start, end) still held
    freed_bytes: int  # weight bytes released
    new_blocks: int  # blocks the pool grew by
    block_bytes: int  # bytes of one block of the new geometry
    seconds: float  # drop latency: start -> the new blocks are usable


@dataclass(slots=True, frozen=True)
class RestoreResult:
    restored: tuple[int, int]
    loaded_bytes: int
    removed_blocks: int
    seconds: float


class LayerStore:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._grown: list[int] = []  # blocks each drop added, undone in reverse by restore

    @property
    def num_layers(self) -> int:
        return self.engine.model_config.num_hidden_layers

    def drop(self, start: int, end: int) -> DropResult:
        """Keep only layers [start, end); grow the KV pool by the freed bytes."""
        t0 = time.perf_counter()
        model = self.engine.model
        if not (model.start <= start < end <= model.end):
            raise LayerStoreError(f"cannot keep [{start}, {end}): this agent holds [{model.start}, {model.end})")
        if (start, end) == (model.start, model.end):
            raise LayerStoreError(f"dropping nothing: [{start}, {end}) is every layer held")
        before = weight_bytes(model)
        kept = {i: layer for i, layer in model.layers.items() if start <= int(i) < end}
        model.set_layers({int(i): layer for i, layer in kept.items()})  # type: ignore[misc]
        if start > 0:
            model.embed_tokens = None
        if end < self.num_layers:
            model.norm, model.lm_head = None, None
        freed = before - weight_bytes(model)
        self.engine.weight_bytes -= freed
        self.engine.kv_cache.set_held_layers(list(range(start, end)))
        block_bytes = self.engine.kv_cache.block_bytes
        new_blocks = freed // block_bytes
        if new_blocks:
            self.engine.grow_kv_pool(new_blocks)
        self._grown.append(new_blocks)
        return DropResult((start, end), freed, new_blocks, block_bytes, time.perf_counter() - t0)

    def missing_weight_names(self) -> list[str]:
        """State-dict names of every weight a full model has and this agent does not hold now."""
        engine, model, cfg = self.engine, self.engine.model, self.engine.model_config
        missing = [i for i in range(self.num_layers) if str(i) not in model.layers]
        names = [f"layers.{i}.{p}" for i in missing for p in _layer_param_names(engine)]
        tied = cfg.tie_word_embeddings
        if model.embed_tokens is None and not (tied and model.lm_head is not None):
            names.append("embed_tokens.weight")
        if model.norm is None:
            names.append("norm.weight")
        if model.lm_head is None and not (tied and model.embed_tokens is not None):
            names.append("lm_head.weight")
        return names

    def restore(self, source: WeightSource | None = None) -> RestoreResult:
        """Give back the blocks the drops added and reload every missing weight from `source` (default:
        the local checkpoint; a PeerWeightSource pulls them from an agent that holds them)."""
        t0 = time.perf_counter()
        engine, model = self.engine, self.engine.model
        if (model.start, model.end) == (0, self.num_layers):
            raise LayerStoreError("nothing to restore: every layer is held")
        # Read first (host memory), so a source that fails leaves the agent exactly as it was.
        weights = (source or engine.checkpoint).read_weights(self.missing_weight_names())
        removed = sum(self._grown)
        if removed:
            try:
                engine.shrink_kv_pool(removed)
            except PoolError as exc:
                raise LayerStoreError(f"cannot restore yet: {exc}") from exc
        self._grown.clear()
        loaded = self.install(weights)
        engine.kv_cache.set_held_layers(list(range(self.num_layers)))
        return RestoreResult((0, self.num_layers), loaded, removed, time.perf_counter() - t0)

    def install(self, weights: dict[str, torch.Tensor]) -> int:
        """Put back every missing layer (and embedding / norm / head) from `weights` (missing_weight_names);
        the KV pool is the caller's business. Returns the weight bytes added."""
        engine, model, cfg = self.engine, self.engine.model, self.engine.model_config
        missing = [i for i in range(self.num_layers) if str(i) not in model.layers]
        before = weight_bytes(model)
        layers = {int(i): layer for i, layer in model.layers.items()}
        for i in missing:
            layers[i] = DecoderLayer(cfg, i, model.dtype, model.device, model.input_major)
        model.set_layers(layers)  # type: ignore[arg-type]
        self._rebuild_ends()
        copy_weights(model, weights, engine.checkpoint.dir)
        loaded = weight_bytes(model) - before
        engine.weight_bytes += loaded
        self._grown.clear()
        return loaded

    def _rebuild_ends(self) -> None:
        """Recreate the embedding, final norm and LM head where missing (tied heads share the embedding);
        their weights are copied in by the caller."""
        model, cfg = self.engine.model, self.engine.model_config
        h, vocab, tied = cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings
        if model.embed_tokens is None:
            model.embed_tokens = empty_embedding(vocab, h, model.dtype, model.device)
            model.embed_tokens.requires_grad_(False)
            if tied and model.lm_head is not None:
                model.embed_tokens.weight = model.lm_head.weight  # the head kept the shared matrix
        if model.norm is None:
            model.norm = RMSNorm(h, cfg.rms_norm_eps, model.dtype, model.device)
        if model.lm_head is None:
            model.lm_head = _linear(h, vocab, False, model.dtype, model.device, model.input_major)
            if tied:
                model.lm_head.weight = model.embed_tokens.weight


def _layer_param_names(engine: LLMEngine) -> list[str]:
    """Parameter names of one decoder layer (e.g. "qkv_proj.weight"), from any held layer."""
    layer = next(iter(engine.model.layers.values()))
    return [name for name, _ in layer.named_parameters()]
