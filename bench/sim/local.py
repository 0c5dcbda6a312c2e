"""The simulator's prediction for the local CPU setup (N agent processes on one machine, `kunserve up`),
from a calibration JSON (`python -m bench.sim calibrate`).

Defaults follow what local mode runs: the ServingPool engine settings of deploy/examples/
servingpool-smollm2.yaml (1 GiB budget per agent, blocks of 16, 16 sequences, 512 tokens per step,
2048-token context), local mode's control loop (plan every 1 s, pressure every 0.25 s, one
reconfiguration at a time), GroupLeader as it is today (its own batch limits, 2 micro-batches, KV exchange
steps of 8 MiB that hold their request) and loopback gRPC costs measured on this machine kind
(../shared/ENVIRONMENT.md: ~0.5 ms per small round trip, ~550 MB/s for large messages, ~7.8 GB/s memory
copy). Agents share the machine's cores: a step slows down when more agents compute than there are cores.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.sim.coop import CoopSettings, ExchangeMode, GroupLimits
from bench.sim.hardware import Deployment, Links, SimConfigError, StepCost, activation_reserve
from bench.sim.metrics import Summary, summarize
from bench.sim.simulator import SimConfig, SimResult, simulate
from bench.sim.state import Policy
from bench.sim.traces import as_trace_requests
from kunserve.operator.cost_model import CostModel
from kunserve.operator.plan_types import PoolSpec

LOCAL_LINKS = Links(
    hop_latency_s=0.0005, hop_bw=550e6, kv_bw=550e6, pcie_bw=7.8e9, restore_bw=1.0e9,
    drop_pause_s=0.05, restore_prepare_s=0.1, restore_fixed_s=0.15,
    source="loopback gRPC and memory copy on the 2-core machine (ENVIRONMENT.md); drop / restore pauses "
           "from bench/results/reconfigure.json (tiny, g=2: prepare 20 + commit 22 ms; restore prepare 75 ms, "
           "commit 139 ms), rounded up",
)


def _local_pool() -> PoolSpec:
    return PoolSpec(drop_demand=0.9, restore_demand=0.5, restore_window_s=30.0, max_group_size=4)


def _local_coop() -> CoopSettings:
    return CoopSettings(depth=2, limits=GroupLimits.LEADER, exchange=ExchangeMode.HELD, exchange_bytes=8 << 20)


@dataclass(slots=True, frozen=True)
class LocalSetup:
    """The local pool. num_kv_blocks (per agent holding every layer) overrides the memory budget's pool, as the
    agents' --kv-blocks does; swap_bandwidth overrides the host copy bandwidth the swap policy pays."""

    replicas: int = 4
    memory_budget_bytes: int = 1 << 30
    num_kv_blocks: int | None = None
    swap_bandwidth: float | None = None
    block_size: int = 16
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    cpu_cores: float = 2.0
    threads_per_agent: float = 1.0
    pool: PoolSpec = field(default_factory=_local_pool)
    plan_interval_s: float = 1.0
    pressure_interval_s: float = 0.25
    one_reconfig_at_a_time: bool = True
    coop: CoopSettings = field(default_factory=_local_coop)
    links: Links = LOCAL_LINKS


@dataclass(slots=True)
class LocalPrediction:
    deployment: Deployment
    summaries: dict[str, Summary]
    results: dict[str, SimResult]

    def to_dict(self) -> dict[str, Any]:
        d = self.deployment
        return {"deployment": {"name": d.name, "kv_blocks": d.kv_blocks, "budget_bytes": d.budget_bytes,
                               "step_cost": d.step.to_dict(), "links": d.links.source},
                "summaries": {k: s.to_dict() for k, s in self.summaries.items()},
                "reconfigs": {k: r.reconfigs for k, r in self.results.items()}}


def load_calibration(calibration: Path | str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(calibration, Mapping):
        return dict(calibration)
    path = Path(calibration)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SimConfigError(f"{path}: not a readable calibration JSON ({exc})") from exc
    for key in ("model_config", "dtype_bytes", "step_cost"):
        if key not in doc:
            raise SimConfigError(f"{path}: missing {key!r} (write it with `python -m bench.sim calibrate`)")
    return dict(doc)


def local_deployment(calibration: Path | str | Mapping[str, Any], setup: LocalSetup | None = None) -> Deployment:
    """The calibrated device as a simulator Deployment with the local pool's memory and batch limits."""
    setup = setup or LocalSetup()
    doc = load_calibration(calibration)
    cfg, dtype = doc["model_config"], int(doc["dtype_bytes"])
    cost = CostModel.from_hf_config(cfg, dtype, block_size=setup.block_size,
                                    stage_latency_s=setup.links.hop_latency_s)
    links = setup.links if setup.swap_bandwidth is None else replace(setup.links, pcie_bw=setup.swap_bandwidth)
    max_len = min(setup.max_model_len, int(cfg.get("max_position_embeddings", setup.max_model_len)))
    dep = Deployment(
        name=f"{Path(str(doc.get('model_dir', 'model'))).name} on {doc.get('device', 'cpu')} (calibrated)",
        cost_model=cost, step=StepCost.from_dict(doc["step_cost"]), links=links,
        budget_bytes=setup.memory_budget_bytes,
        reserve_bytes=activation_reserve(cfg, dtype, setup.max_num_batched_tokens, setup.max_num_seqs, max_len),
        hidden_size=int(cfg["hidden_size"]), max_num_seqs=setup.max_num_seqs,
        max_num_batched_tokens=setup.max_num_batched_tokens, max_model_len=max_len, dtype_bytes=dtype,
        num_kv_blocks=setup.num_kv_blocks,
    )
    _ = dep.kv_blocks  # raises when the budget holds no KV block
    return dep


def predict_local(calibration: Path | str | Mapping[str, Any], requests: Iterable[object],
                  setup: LocalSetup | None = None,
                  policies: Sequence[str] = (Policy.KUNSERVE, Policy.VLLM)) -> LocalPrediction:
    """The simulator's prediction for the local N-agent CPU setup serving `requests`.

    calibration: the JSON `python -m bench.sim calibrate` wrote (or its parsed dict); requests: items with
    arrival_s (seconds from the start) and prompt / output lengths (TraceRequest, or the burst benchmark's
    WorkItem with prompt_len / output_len); setup: the pool's settings (LocalSetup() mirrors `kunserve up`
    with servingpool-smollm2.yaml at 4 replicas); policies: names or Policy values ("kunserve", "vllm",
    "swap", "llumnix"). Returns per policy name the Summary (TTFT / TPOT p50 / p90 / p99, the tail's TTFT
    breakdown, counters) and the raw SimResult (per-request times, reconfigurations, timeline)."""
    setup = setup or LocalSetup()
    dep = local_deployment(calibration, setup)
    trace = as_trace_requests(requests)
    results: dict[str, SimResult] = {}
    for policy in policies:
        cfg = SimConfig(deployment=dep, policy=Policy(policy), instances=setup.replicas, pool=setup.pool,
                        plan_interval_s=setup.plan_interval_s, pressure_interval_s=setup.pressure_interval_s,
                        one_reconfig_at_a_time=setup.one_reconfig_at_a_time, coop=setup.coop,
                        cpu_cores=setup.cpu_cores, threads_per_instance=setup.threads_per_agent)
        results[str(Policy(policy))] = simulate(trace, cfg)
    return LocalPrediction(dep, {k: summarize(r) for k, r in results.items()}, results)
