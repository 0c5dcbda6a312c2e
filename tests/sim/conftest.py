"""A small overloaded pool: 4 Llama-2-13B-class instances on A100s with 160 KV blocks each, a burst of 6x."""

from __future__ import annotations

import pytest

from bench.sim.hardware import Deployment, gpu_deployment
from bench.sim.traces import TraceRequest, TraceSpec, generate
from kunserve.operator.plan_types import PoolSpec


def small_deployment(blocks: int = 160) -> Deployment:
    base = gpu_deployment("a100", "llama2-13b", max_num_seqs=32, max_num_batched_tokens=512)
    cost = base.cost_model
    return base.with_overrides(budget_bytes=cost.full_weight_bytes + base.reserve_bytes + blocks * cost.block_bytes())


def burst_trace(seed: int = 1, factor: float = 6.0, rate: float = 1.0) -> list[TraceRequest]:
    return generate(TraceSpec(duration_s=20, base_rate=rate, burst_factor=factor, burst_start_s=4, burst_len_s=6,
                              seed=seed, max_prompt=512, max_output=192))


@pytest.fixture(scope="session")
def dep() -> Deployment:
    return small_deployment()


@pytest.fixture(scope="session")
def pool() -> PoolSpec:
    return PoolSpec(restore_window_s=2.0, max_group_size=2)
