"""Engine configuration and the device memory budget that sizes the KV pool."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kunserve.agent.engine.scheduler import SchedulerConfig
from kunserve.agent.model.config import ModelConfig

DEFAULT_CPU_KV_BYTES = 512 * 1024**2  # KV pool on CPU when no budget is given


@dataclass(slots=True)
class EngineConfig:
    model: str  # checkpoint directory
    dtype: str = "float32"
    device: str = "auto"  # "auto": cuda when available, else cpu
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    memory_budget_bytes: int | None = None  # B = weights + KV pool + reserve; default per device
    gpu_memory_utilization: float = 0.9  # on CUDA, the default budget is free memory x this
    num_kv_blocks: int | None = None  # override the budget (tests, benchmarks)
    layer_range: tuple[int, int] | None = None  # [start, end) of the layers this process holds
    seed: int | None = None  # sampler seed for requests without their own
    torch_threads: int | None = None  # torch intra-op threads (CPU); None leaves torch's default
    progress: bool = True  # progress bar while loading
    # "output-major" (the checkpoint's layout), "input-major" (much faster CPU matmuls for one row, no
    # measurable gain at 16), or "auto": input-major on CPU when max_num_seqs <= 4.
    weight_layout: str = "auto"

    def input_major(self, device: torch.device) -> bool:
        if self.weight_layout not in ("auto", "input-major", "output-major"):
            raise ValueError(f"weight_layout must be auto, input-major or output-major, got {self.weight_layout!r}")
        if self.weight_layout == "auto":
            return device.type == "cpu" and self.max_num_seqs <= 4
        return self.weight_layout == "input-major"

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def scheduler_config(self, num_blocks: int) -> SchedulerConfig:
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            watermark_blocks=max(0, num_blocks // 100),
        )


def activation_reserve_bytes(cfg: ModelConfig, config: EngineConfig, elem: int) -> int:
    """Bytes kept back for one step's activations: the widest per-token tensors times the token
    budget, plus the largest prefill attention score matrix and fp32 logits of every sampled row."""
    tokens = config.max_num_batched_tokens
    per_token = (cfg.hidden_size * 4 + cfg.q_size + 2 * cfg.kv_size + 3 * cfg.intermediate_size) * elem
    max_len = config.max_model_len or cfg.max_position_embeddings
    scores = cfg.num_attention_heads * tokens * max_len * elem
    logits = config.max_num_seqs * cfg.vocab_size * 4 * 2
    return tokens * per_token + scores + logits


def budget_bytes(config: EngineConfig, device: torch.device, weights: int, reserve: int) -> int:
    """The device memory budget B: explicit, else free CUDA memory x utilisation, else a CPU default."""
    if config.memory_budget_bytes is not None:
        return config.memory_budget_bytes
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Weights are already resident, so free memory excludes them; add them back to get B.
        return int(free * config.gpu_memory_utilization) + weights
    return weights + reserve + DEFAULT_CPU_KV_BYTES
