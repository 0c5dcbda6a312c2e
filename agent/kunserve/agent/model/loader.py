"""Loads HF-format Llama-family checkpoints: config.json, single or sharded safetensors, tokenizer.

Only the tensors of the requested layer range are read, so a stage (or a restore of a few layers)
never touches the rest of the file. HF's separate q/k/v and gate/up projections are fused on load.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from kunserve.agent.errors import CheckpointError
from kunserve.agent.model.config import ModelConfig
from kunserve.agent.model.llama import LlamaModel

_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {sorted(DTYPES)}") from None


class Checkpoint:
    """A checkpoint directory: its config and where every tensor lives."""

    def __init__(self, model_dir: Path | str) -> None:
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(self.dir, "checkpoint directory not found")
        self.config = ModelConfig.from_file(self.dir / "config.json")
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                raw = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(index, f"malformed index (needs a weight_map object): {exc}") from exc
            files = {name: self.dir / fname for name, fname in raw.items()}
            for path in set(files.values()):
                if not path.is_file():
                    raise CheckpointError(path, f"shard named in {index.name} not found")
            return files
        single = self.dir / "model.safetensors"
        if not single.is_file():
            raise CheckpointError(single, "file not found (need model.safetensors or model.safetensors.index.json)")
        try:
            with safe_open(str(single), framework="pt") as f:
                return {name: single for name in f.keys()}  # noqa: SIM118 — safe_open is not a dict
        except Exception as exc:
            raise CheckpointError(single, f"not a valid safetensors file: {exc}") from exc

    def read(self, names: Iterable[str], progress: bool = False, desc: str = "loading") -> dict[str, torch.Tensor]:
        """Read the named tensors (CPU), grouped by file; a missing name is a CheckpointError."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            path = self.weight_map.get(name)
            if path is None:
                raise CheckpointError(self.dir, f"tensor {name!r} not found in the checkpoint")
            by_file.setdefault(path, []).append(name)
        out: dict[str, torch.Tensor] = {}
        total = sum(len(v) for v in by_file.values())
        with tqdm(total=total, desc=desc, unit="tensor", disable=not progress, leave=False) as bar:
            for path, file_names in by_file.items():
                try:
                    with safe_open(str(path), framework="pt") as f:
                        for name in file_names:
                            out[name] = f.get_tensor(name)
                            bar.update(1)
                except CheckpointError:
                    raise
                except Exception as exc:
                    raise CheckpointError(path, f"cannot read tensors: {exc}") from exc
        return out

    def read_weights(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Tensors under the engine's state-dict names ("layers.3.qkv_proj.weight", "embed_tokens.weight",
        "norm.weight", "lm_head.weight"), mapped to the checkpoint's HF names (q/k/v and gate/up fused)."""
        out: dict[str, torch.Tensor] = {}
        layers: dict[int, dict[str, torch.Tensor]] = {}
        for name in names:
            m = _LAYER_NAME.match(name)
            if m:
                i = int(m.group(1))
                if i not in layers:
                    layers[i] = self.read_layer(i)
                if m.group(2) not in layers[i]:
                    raise CheckpointError(self.dir, f"no tensor for {name}")
                out[name] = layers[i][m.group(2)]
                continue
            hf = {
                "embed_tokens.weight": "model.embed_tokens.weight",
                "norm.weight": "model.norm.weight",
                "lm_head.weight": "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight",
            }.get(name)
            if hf is None:
                raise CheckpointError(self.dir, f"unknown weight name {name!r}")
            out[name] = self.read([hf])[hf]
        return out

    def layer_tensor_names(self, layer: int) -> list[str]:
        p = f"model.layers.{layer}."
        names = [p + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                  "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                  "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                  "mlp.down_proj.weight")]
        if self.config.attention_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        return names

    def read_layer(self, layer: int) -> dict[str, torch.Tensor]:
        """One decoder layer's weights under the engine's (fused) parameter names."""
        t = self.read(self.layer_tensor_names(layer))
        p = f"model.layers.{layer}."
        fused = {
            "input_layernorm.weight": t[p + "input_layernorm.weight"],
            "post_attention_layernorm.weight": t[p + "post_attention_layernorm.weight"],
            "qkv_proj.weight": torch.cat([t[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
            "o_proj.weight": t[p + "self_attn.o_proj.weight"],
            "gate_up_proj.weight": torch.cat([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]]),
            "down_proj.weight": t[p + "mlp.down_proj.weight"],
        }
        if self.config.attention_bias:
            fused["qkv_proj.bias"] = torch.cat([t[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        return fused


def copy_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Copy tensors named as in the model's state dict into its parameters (shape-checked, cast to the
    parameter's dtype/device/layout)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, value in weights.items():
        target = params.get(name)
        if target is None:
            raise CheckpointError(source, f"{name}: the model has no such parameter")
        if tuple(target.shape) != tuple(value.shape):
            raise CheckpointError(source, f"{name}: shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value)


def parameter_names(model: torch.nn.Module) -> list[str]:
    """State-dict names of the model's parameters, one per storage (a tied LM head is loaded once)."""
    seen: set[int] = set()
    names = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            names.append(name)
    return names


def load_model(
    ckpt: Checkpoint,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    layer_range: tuple[int, int] | None = None,
    progress: bool = True,
    input_major: bool = False,
) -> LlamaModel:
    """Build the layers [start, end) of the checkpoint's model on `device` and load their weights."""
    cfg = ckpt.config
    start, end = layer_range or (0, cfg.num_hidden_layers)
    model = LlamaModel(cfg, start, end, dtype, torch.device(device), input_major)
    names = parameter_names(model)
    parts = [[n for n in names if not n.startswith("layers.")]]
    parts += [[n for n in names if n.startswith(f"layers.{i}.")] for i in range(start, end)]
    with tqdm(total=len(parts), desc=f"loading {ckpt.dir.name}", unit="part", disable=not progress) as bar:
        for part in parts:
            copy_weights(model, ckpt.read_weights(part), ckpt.dir)
            bar.update(1)
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's resident parameters (a tied weight counts once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total
