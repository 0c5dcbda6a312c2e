"""The simulator end to end: deterministic, conserving, driven by the operator's own planner, and equal to
vLLM when no burst makes the planner act."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.sim.hardware import Deployment
from bench.sim.simulator import SimConfig, SimResult, simulate
from bench.sim.state import Policy
from kunserve.operator import planner
from kunserve.operator.plan_types import GroupPlan, PoolSpec
from tests.sim.conftest import burst_trace

REPO = Path(__file__).resolve().parents[2]


def _times(res: SimResult) -> list[tuple[str, float | None, float | None, int]]:
    return [(r.rid, r.first_token, r.finish, r.preemptions) for r in res.requests]


def _run(dep: Deployment, pool: PoolSpec, policy: Policy, seed: int = 1, factor: float = 6.0) -> SimResult:
    return simulate(burst_trace(seed, factor), SimConfig(dep, policy, instances=4, pool=pool))


@pytest.mark.parametrize("policy", list(Policy))
def test_every_request_finishes_exactly_once(dep: Deployment, pool: PoolSpec, policy: Policy) -> None:
    res = _run(dep, pool, policy)  # simulate() also checks every pool: free + used = total, none left used
    assert res.unfinished == 0
    assert [r.finished_count for r in res.requests] == [1] * len(res.requests)
    for r in res.requests:
        assert r.first_token is not None and r.finish is not None
        assert r.arrival <= r.first_token <= r.finish
    assert res.counters["preemptions"] > 0 or policy is Policy.KUNSERVE  # the burst does overload KV
    if policy is Policy.KUNSERVE:
        assert res.counters["drops"] >= 1 and res.counters["restores"] >= 1  # through a drop and a restore
        assert res.counters["kv_bytes_exchanged"] > 0
    if policy is Policy.SWAP:
        assert res.counters["swaps"] > 0


def test_group_leader_as_built_also_conserves(dep: Deployment, pool: PoolSpec) -> None:
    from bench.sim.coop import CoopSettings, ExchangeMode, GroupLimits

    coop = CoopSettings(limits=GroupLimits.LEADER, exchange=ExchangeMode.HELD)
    res = simulate(burst_trace(), SimConfig(dep, Policy.KUNSERVE, instances=4, pool=pool, coop=coop))
    assert res.unfinished == 0 and all(r.finished_count == 1 for r in res.requests)
    assert res.counters["drops"] >= 1 and res.counters["kv_bytes_exchanged"] > 0


@pytest.mark.parametrize("policy", [Policy.KUNSERVE, Policy.VLLM])
def test_a_seed_gives_the_same_results(dep: Deployment, pool: PoolSpec, policy: Policy) -> None:
    a, b = _run(dep, pool, policy), _run(dep, pool, policy)
    assert _times(a) == _times(b)
    assert a.reconfigs == b.reconfigs
    assert _times(_run(dep, pool, policy, seed=2)) != _times(a)


def test_the_planner_called_is_the_operators(dep: Deployment, pool: PoolSpec,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real_drops, real_restores = planner.plan_drops, planner.plan_restores
    plans: list[GroupPlan] = []
    restore_calls = 0

    def spy_drops(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real_drops(*args, **kwargs)
        plans.extend(out)
        return out

    def spy_restores(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal restore_calls
        restore_calls += 1
        return real_restores(*args, **kwargs)

    monkeypatch.setattr(planner, "plan_drops", spy_drops)
    monkeypatch.setattr(planner, "plan_restores", spy_restores)
    res = _run(dep, pool, Policy.KUNSERVE)
    assert plans and restore_calls > 0
    drops = [e for e in res.reconfigs if e["action"] == "Drop"]
    applied = {(tuple(e["members"]), tuple((s["layerStart"], s["layerEnd"]) for s in e["stages"])) for e in drops}
    planned = {(p.members, tuple((s.layer_start, s.layer_end) for s in p.stages)) for p in plans}
    assert applied and applied <= planned  # every group formed is one the planner returned, stages as planned
    assert all(e["group"] in {p.group_id for p in plans} for e in drops)


def test_a_planner_that_never_drops_gives_vllm(dep: Deployment, pool: PoolSpec,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planner, "plan_drops", lambda *a, **k: [])
    assert _times(_run(dep, pool, Policy.KUNSERVE)) == _times(_run(dep, pool, Policy.VLLM))


def test_without_a_burst_kunserve_equals_vllm(dep: Deployment, pool: PoolSpec) -> None:
    ks, vl = _run(dep, pool, Policy.KUNSERVE, factor=1.0), _run(dep, pool, Policy.VLLM, factor=1.0)
    assert ks.reconfigs == []
    assert _times(ks) == _times(vl)


def test_kunserve_cuts_the_tail_under_this_burst(dep: Deployment, pool: PoolSpec) -> None:
    def p99(res: SimResult) -> float:
        ttfts = sorted(r.first_token - r.arrival for r in res.requests if r.first_token is not None)
        return ttfts[int(0.99 * (len(ttfts) - 1))]

    assert p99(_run(dep, pool, Policy.KUNSERVE)) < p99(_run(dep, pool, Policy.VLLM))


def test_importing_the_simulator_and_scheduler_is_cheap() -> None:
    code = ("import sys, bench.sim.simulator, kunserve.agent.engine.scheduler; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
