"""Named hardware and model parameter sets, and the step cost model the simulated instances run on.

Every public figure is labelled with its source. Efficiency factors (achieved fraction of a peak) are
assumptions, named as such, and are the knobs to revisit when a real profile is at hand: `calibrate`
replaces the whole roofline with a fit of the real engine's step times on the device it runs on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from kunserve.operator.cost_model import CostModel

GB = 1e9


class SimConfigError(ValueError):
    """A simulator parameter set is unknown or inconsistent (the message names it)."""


@dataclass(slots=True, frozen=True)
class GpuSpec:
    """Peak figures of one GPU (per direction for links) and the achieved fractions assumed of them."""

    name: str
    mem_bytes: float
    hbm_bw: float  # bytes/s
    bf16_flops: float  # dense FLOP/s
    nvlink_bw: float  # bytes/s per direction
    pcie_bw: float  # bytes/s per direction (host <-> device)
    nic_bw: float  # bytes/s per GPU, scale-out network
    source: str
    mem_eff: float = 0.8  # assumption: achieved HBM bandwidth in decode GEMV / paged attention kernels
    mfu: float = 0.55  # assumption: achieved tensor-core throughput in prefill GEMMs
    attn_eff: float = 0.4  # assumption: achieved throughput in prefill attention
    link_eff: float = 0.8  # assumption: achieved fraction of PCIe / NIC peak for bulk copies


A100_80G = GpuSpec(
    "A100-80G", mem_bytes=80 * GB, hbm_bw=2039 * GB, bf16_flops=312e12, nvlink_bw=300 * GB,
    pcie_bw=32 * GB, nic_bw=25 * GB,
    source="NVIDIA A100 80GB SXM datasheet (HBM2e 2,039 GB/s; BF16 312 TFLOPS dense; NVLink 600 GB/s "
           "bidirectional; PCIe Gen4 x16 64 GB/s bidirectional); DGX A100: one 200 Gb/s HDR InfiniBand "
           "ConnectX-6 per GPU",
)
H100_80G = GpuSpec(
    "H100-80G", mem_bytes=80 * GB, hbm_bw=3350 * GB, bf16_flops=989e12, nvlink_bw=450 * GB,
    pcie_bw=64 * GB, nic_bw=50 * GB,
    source="NVIDIA H100 SXM5 80GB datasheet (HBM3 3.35 TB/s; BF16 989 TFLOPS dense, 1,979 with sparsity; "
           "NVLink 900 GB/s bidirectional; PCIe Gen5 x16 128 GB/s bidirectional); DGX H100: one 400 Gb/s "
           "ConnectX-7 per GPU",
)
GPUS: dict[str, GpuSpec] = {"a100": A100_80G, "h100": H100_80G}


@dataclass(slots=True, frozen=True)
class ModelPreset:
    name: str
    config: Mapping[str, Any]  # the config.json values the planner's CostModel.from_hf_config reads
    default_tp: int  # GPUs per instance (tensor parallel within a node)
    source: str
    dtype_bytes: int = 2


LLAMA2_13B = ModelPreset(
    "llama2-13b",
    {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
     "num_key_value_heads": 40, "vocab_size": 32000, "max_position_embeddings": 4096,
     "tie_word_embeddings": False, "model_type": "llama"},
    default_tp=1,
    source="meta-llama/Llama-2-13b-hf config.json (40 layers, hidden 5120, MHA 40 heads, vocab 32000); "
           "~13.0 B parameters, 26 GB in bf16",
)
LLAMA3_70B = ModelPreset(
    "llama3-70b",
    {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
     "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
     "tie_word_embeddings": False, "model_type": "llama"},
    default_tp=4,
    source="meta-llama/Meta-Llama-3-70B config.json (80 layers, hidden 8192, GQA 64/8 heads, vocab 128256); "
           "~70.6 B parameters, 141 GB in bf16",
)
MODELS: dict[str, ModelPreset] = {"llama2-13b": LLAMA2_13B, "llama3-70b": LLAMA3_70B}


@dataclass(slots=True, frozen=True)
class StepCost:
    """Seconds one engine step takes (full model; a stage holding a fraction f of the layers scales the
    layer terms by f):

        t = base_s + seqs * seq_s + f * (layer_base_s + max(weights_s, tokens * token_s + pairs * pair_s)
                                         + ctx * ctx_s)

    tokens: tokens computed this step; pairs: prefill (query, key) pairs; ctx: context tokens the decodes
    read; seqs: sequences in the batch (sampling and bookkeeping per sequence, not per layer). The max is
    the roofline: a step streams every weight once, or is bound by its FLOPs."""

    base_s: float
    layer_base_s: float
    weights_s: float
    token_s: float
    pair_s: float
    ctx_s: float
    seq_s: float = 0.0
    source: str = ""

    def time(self, tokens: int, pairs: float, ctx: int, fraction: float = 1.0, seqs: int = 0) -> float:
        body = max(self.weights_s, tokens * self.token_s + pairs * self.pair_s) + ctx * self.ctx_s
        return self.base_s + seqs * self.seq_s + fraction * (self.layer_base_s + body)

    def to_dict(self) -> dict[str, float | str]:
        return {"base_s": self.base_s, "layer_base_s": self.layer_base_s, "weights_s": self.weights_s,
                "token_s": self.token_s, "pair_s": self.pair_s, "ctx_s": self.ctx_s, "seq_s": self.seq_s,
                "source": self.source}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepCost:
        return cls(base_s=float(d["base_s"]), layer_base_s=float(d["layer_base_s"]), weights_s=float(d["weights_s"]),
                   token_s=float(d["token_s"]), pair_s=float(d["pair_s"]), ctx_s=float(d["ctx_s"]),
                   seq_s=float(d.get("seq_s", 0.0)), source=str(d.get("source", "")))


@dataclass(slots=True, frozen=True)
class Links:
    """Transfer costs between and into instances.

    hop_latency_s / hop_bw: one pipeline hop of hidden states (and of one remote-attention leg);
    kv_bw: KV exchange and KV migration between instances; pcie_bw: swap to / from host memory;
    restore_bw: weights back into device memory on restore."""

    hop_latency_s: float
    hop_bw: float
    kv_bw: float
    pcie_bw: float
    restore_bw: float
    drop_pause_s: float  # Prepare + Commit of a drop, the members paused
    restore_prepare_s: float  # weights staged in host memory while the group still serves
    restore_fixed_s: float  # fixed part of a restore's pause (pools rebuilt, replicas back)
    source: str = ""


@dataclass(slots=True, frozen=True)
class Deployment:
    """One instance kind: a model on tp GPUs (or one calibrated device), its memory and its costs."""

    name: str
    cost_model: CostModel  # the planner's view (weights per layer, KV bytes per token per layer)
    step: StepCost
    links: Links
    budget_bytes: int  # B of one instance
    reserve_bytes: int  # activation reserve
    hidden_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    dtype_bytes: int = 2  # activations on the wire (pipeline hops)
    num_kv_blocks: int | None = None  # an explicit pool size (EngineConfig.num_kv_blocks) instead of the budget's

    @property
    def kv_blocks(self) -> int:
        """KV blocks of a full replica: num_kv_blocks, else (B - weights - reserve) // block bytes."""
        if self.num_kv_blocks is not None:
            if self.num_kv_blocks < 1:
                raise SimConfigError(f"{self.name}: num_kv_blocks must be >= 1")
            return self.num_kv_blocks
        free = self.budget_bytes - self.cost_model.full_weight_bytes - self.reserve_bytes
        if free <= 0:
            raise SimConfigError(f"{self.name}: the memory budget leaves no KV blocks")
        return free // self.cost_model.block_bytes()

    def with_overrides(self, **kw: Any) -> Deployment:
        return replace(self, **kw)


def activation_reserve(config: Mapping[str, Any], dtype_bytes: int, max_tokens: int, max_seqs: int,
                       max_len: int) -> int:
    """One step's activations: the widest per-token tensors x the token budget, the largest prefill score
    matrix and fp32 logits of every sampled row (the same terms as the agent's activation_reserve_bytes)."""
    h, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or h // heads)
    per_token = (h * 4 + heads * head_dim + 2 * kv * head_dim + 3 * inter) * dtype_bytes
    scores = heads * max_tokens * max_len * dtype_bytes
    return max_tokens * per_token + scores + max_seqs * int(config["vocab_size"]) * 8


def roofline(gpu: GpuSpec, model: ModelPreset, tp: int, cost: CostModel) -> StepCost:
    """Step cost of `model` on `tp` GPUs of kind `gpu` from the public peaks and the assumed efficiencies."""
    cfg = model.config
    weights = cost.full_weight_bytes
    compute_params = (weights - cost.embed_bytes) / model.dtype_bytes  # the embedding lookup costs no FLOPs
    h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    q_size = heads * int(cfg.get("head_dim") or h // heads)
    layers = cost.num_layers
    bw, flops = tp * gpu.hbm_bw * gpu.mem_eff, tp * gpu.bf16_flops
    allreduce_s = 0.0 if tp == 1 else 2 * layers * 12e-6  # assumption: ~12 us per NVLink all-reduce, 2 per layer
    return StepCost(
        base_s=0.002,  # assumption: scheduling + sampling + launch per step (CUDA graphs for decode)
        layer_base_s=allreduce_s + layers * 10e-6,  # assumption: ~10 us of launches / norms per layer
        weights_s=weights / bw,
        token_s=2 * compute_params / (flops * gpu.mfu),
        pair_s=4 * layers * q_size / (flops * gpu.attn_eff),
        ctx_s=cost.kv_bytes_per_token() / bw,
        source=f"roofline {model.name} on {tp}x {gpu.name}",
    )


def gpu_links(gpu: GpuSpec, tp: int) -> Links:
    """Instances in different nodes (the conservative case): hops and KV over the NICs of the instance's
    tp GPUs, swap and restore over their PCIe links."""
    net, pcie = tp * gpu.nic_bw * gpu.link_eff, tp * gpu.pcie_bw * gpu.link_eff
    return Links(
        hop_latency_s=30e-6,  # assumption: NCCL send/recv of a small tensor across nodes (RDMA), incl. sync
        hop_bw=net, kv_bw=net, pcie_bw=pcie, restore_bw=pcie,
        drop_pause_s=0.010,  # assumption: Prepare/Commit RPCs + freeing weights + growing the pool
        restore_prepare_s=0.0,  # weights kept in host memory (the paper's design): nothing to stage
        restore_fixed_s=0.010,
        source=f"{gpu.name}: {tp} x NIC {gpu.nic_bw / GB:.0f} GB/s and PCIe {gpu.pcie_bw / GB:.0f} GB/s x "
               f"{gpu.link_eff} efficiency",
    )


def gpu_deployment(gpu_key: str, model_key: str, tp: int | None = None, *, block_size: int = 16,
                   gpu_memory_utilization: float = 0.9, max_num_seqs: int = 1024,
                   max_num_batched_tokens: int = 2048, max_model_len: int = 8192) -> Deployment:
    """A named GPU deployment. max_num_seqs is high on purpose: KV memory, not the sequence cap, binds
    (the regime the paper studies); max_num_batched_tokens is the chunked-prefill budget."""
    try:
        gpu, model = GPUS[gpu_key], MODELS[model_key]
    except KeyError as exc:
        raise SimConfigError(f"unknown preset {exc.args[0]!r}: gpus {sorted(GPUS)}, models {sorted(MODELS)}") from exc
    tp = tp or model.default_tp
    if tp < 1:
        raise SimConfigError(f"tp must be >= 1, got {tp}")
    cost = CostModel.from_hf_config(model.config, model.dtype_bytes, block_size=block_size)
    links = gpu_links(gpu, tp)
    cost = replace(cost, stage_latency_s=links.hop_latency_s)
    max_model_len = min(max_model_len, int(model.config["max_position_embeddings"]))
    # flash attention materialises no score matrix on GPU: max_len 0 leaves that term out
    reserve = activation_reserve(model.config, model.dtype_bytes, max_num_batched_tokens, max_num_seqs, 0)
    dep = Deployment(
        name=f"{model.name} on {tp}x {gpu.name}", cost_model=cost, step=roofline(gpu, model, tp, cost), links=links,
        budget_bytes=math.floor(tp * gpu.mem_bytes * gpu_memory_utilization), reserve_bytes=reserve,
        hidden_size=int(model.config["hidden_size"]), max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len, dtype_bytes=model.dtype_bytes,
    )
    _ = dep.kv_blocks  # fail early when the model does not fit
    return dep
