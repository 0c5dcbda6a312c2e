"""Traces, the calibration fit, the local prediction, Llumnix-like migration and the heap block manager."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.sim.calibrate import Point, calibrate, fit, nnls, predict
from bench.sim.hardware import Deployment, StepCost
from bench.sim.instance import HeapBlockManager
from bench.sim.local import LocalSetup, local_deployment, predict_local
from bench.sim.simulator import SimConfig, Simulator
from bench.sim.state import Policy
from bench.sim.traces import TraceKind, TraceSpec, describe, generate, load_burstgpt_csv, write_burstgpt_csv
from kunserve.agent.engine.block_manager import BlockManager

TINY_CONFIG = {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 8, "num_attention_heads": 6,
               "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 2048, "max_position_embeddings": 2048,
               "tie_word_embeddings": True, "model_type": "llama"}


def test_traces_are_seeded_and_shaped() -> None:
    spec = TraceSpec(TraceKind.BURSTGPT, duration_s=400, base_rate=20, burst_factor=1, seed=3)
    a, b = generate(spec), generate(spec)
    assert a == b and a != generate(TraceSpec(TraceKind.BURSTGPT, duration_s=400, base_rate=20, burst_factor=1))
    d = describe(a)
    assert d["rate_per_s"] == pytest.approx(20, rel=0.15)
    assert d["interarrival_cv"] == pytest.approx(2.0, rel=0.2)  # Gamma inter-arrivals of CV 2
    assert 300 < d["prompt_median"] < 600 and 200 < d["output_median"] < 360
    conv = describe(generate(TraceSpec(TraceKind.AZURE_CONV, duration_s=200, base_rate=20, burst_factor=1)))
    code = describe(generate(TraceSpec(TraceKind.AZURE_CODE, duration_s=200, base_rate=20, burst_factor=1)))
    assert conv["prompt_median"] == pytest.approx(1020, rel=0.15)
    assert conv["output_median"] == pytest.approx(129, rel=0.2)
    assert code["prompt_median"] == pytest.approx(1500, rel=0.15) and code["output_median"] < 20


def test_a_burst_phase_raises_the_rate() -> None:
    reqs = generate(TraceSpec(duration_s=90, base_rate=10, burst_factor=5, burst_start_s=30, burst_len_s=30, cv=1.0))
    inside = sum(1 for r in reqs if 30 <= r.arrival_s < 60)
    assert inside / 30 == pytest.approx(50, rel=0.2) and (len(reqs) - inside) / 60 == pytest.approx(10, rel=0.25)


def test_burstgpt_csv_round_trip(tmp_path: Path) -> None:
    reqs = generate(TraceSpec(duration_s=30, base_rate=5, seed=4))
    path = tmp_path / "trace.csv"
    write_burstgpt_csv(path, reqs)
    back = load_burstgpt_csv(path)
    assert [(r.prompt_tokens, r.output_tokens) for r in back] == [(r.prompt_tokens, r.output_tokens) for r in reqs]
    assert [r.arrival_s for r in back] == pytest.approx([r.arrival_s for r in reqs], abs=1e-5)
    window = load_burstgpt_csv(path, start_s=10, duration_s=10, time_scale=2.0)
    assert window and all(0 <= r.arrival_s < 5 for r in window)


def test_nnls_and_fit_recover_known_costs() -> None:
    assert min(nnls([[1, 0], [1, 1], [1, 2]], [2.0, 1.0, 0.0])) >= 0  # the negative slope is dropped
    true = StepCost(base_s=0.002, layer_base_s=0.008, weights_s=0.0, token_s=1e-4, pair_s=2e-7, ctx_s=5e-7,
                    seq_s=3e-4)
    points = [Point("prefill", 1, n, 0.0) for n in (16, 64, 160, 320, 480)]
    points += [Point("decode", b, c, 0.0) for c in (32, 512) for b in (1, 4, 16)]
    points = [Point(p.kind, p.batch, p.tokens, predict(true, p)) for p in points]
    got = fit(points, layer_share=0.8)
    for name in ("base_s", "layer_base_s", "token_s", "pair_s", "ctx_s", "seq_s"):
        assert getattr(got, name) == pytest.approx(getattr(true, name), rel=1e-6, abs=1e-12)


def _calibration(step: StepCost | None = None) -> dict[str, Any]:
    step = step or StepCost(base_s=0.001, layer_base_s=0.004, weights_s=0.0, token_s=5e-5, pair_s=1e-7,
                            ctx_s=1e-6, seq_s=2e-4)
    return {"model_config": TINY_CONFIG, "dtype_bytes": 4, "step_cost": step.to_dict(), "model_dir": "tiny",
            "device": "cpu"}


def test_predict_local_from_a_calibration() -> None:
    setup = LocalSetup(memory_budget_bytes=64 << 20)
    dep = local_deployment(_calibration(), setup)
    assert dep.kv_blocks > 0 and dep.max_num_seqs == 16
    reqs = generate(TraceSpec(duration_s=20, base_rate=2, burst_factor=8, burst_start_s=5, burst_len_s=5, seed=2,
                              max_prompt=256, max_output=256, output_scale=3))
    pred = predict_local(_calibration(), reqs, setup)
    assert set(pred.summaries) == {"kunserve", "vllm"}
    for s in pred.summaries.values():
        assert s.finished == len(reqs) and s.ttft_s["p99"] > 0
    assert pred.to_dict()["deployment"]["kv_blocks"] == dep.kv_blocks


def test_predict_local_takes_work_items_and_a_pool_size() -> None:
    @dataclass(frozen=True)
    class Item:  # the burst benchmark's WorkItem shape
        arrival_s: float
        prompt_len: int
        output_len: int

    items = [Item(0.1 * i, 40 + i, 20) for i in range(30)]
    setup = LocalSetup(replicas=2, num_kv_blocks=12, max_num_seqs=8, max_model_len=1024)
    pred = predict_local(_calibration(), items, setup, policies=["kunserve", "vllm", "swap", "llumnix"])
    assert pred.deployment.kv_blocks == 12
    names = ["kunserve", "vllm", "swap", "llumnix"]
    assert {k: s.finished for k, s in pred.summaries.items()} == dict.fromkeys(names, 30)
    assert pred.summaries["vllm"].overall.queue_s > 0  # 12 blocks hold two of these requests at a time


def test_calibrate_runs_the_real_engine(tiny_dir: Path, tmp_path: Path) -> None:
    doc = calibrate(str(tiny_dir), tmp_path / "cal.json", prompt_lens=(16, 48, 96), batch_sizes=(1, 4),
                    contexts=(16, 64), reps=1, decode_steps=3, threads=1)
    assert (tmp_path / "cal.json").is_file() and len(doc["points"]) == 7
    assert doc["dtype_bytes"] == 4 and doc["model_config"]["num_hidden_layers"] == 8
    assert all(p["measured_s"] > 0 for p in doc["points"])
    assert local_deployment(tmp_path / "cal.json", LocalSetup(memory_budget_bytes=64 << 20)).kv_blocks > 0


def test_migration_moves_a_request_to_an_idle_instance(dep: Deployment) -> None:
    reqs = generate(TraceSpec(duration_s=1, base_rate=1, burst_factor=1, seed=0))[:1]
    sim = Simulator(reqs, SimConfig(dep, Policy.LLUMNIX, instances=2))
    src, dst = sim.instances
    from bench.sim.state import SimRequest

    fillers = []
    for i in range(40):  # overload src by hand: more than its 160 blocks of running + waiting requests
        req = SimRequest(f"f{i}", 0.0, 400, 50, home=0)
        sim.requests[req.rid] = req
        sim.reqs.append(req)
        src.add(req)
        src.routed += 1
        fillers.append(req)
    src.kick(0.0)
    sim.run_until(0.5)  # a few steps: the first requests have KV to move
    assert src.sched.waiting and src.sched.running
    assert sim.migrator is not None
    sim.migrator.tick(sim.now)
    assert sim.migrator.outgoing == {0}
    sim.run_until(sim.now + 0.2)
    assert sim.migrator.migrations >= 1 and dst.sched.running
    moved = next(r for r in fillers if r.migrations)
    assert moved.home == 1


def test_heap_block_manager_lowest_free_matches_the_base_class() -> None:
    for seed in range(100):
        rng = random.Random(seed)
        a, b = HeapBlockManager(100, 4), BlockManager(100, 4)
        ta: list[list[int]] = [[] for _ in range(8)]
        tb: list[list[int]] = [[] for _ in range(8)]
        for _ in range(60):
            i, n = rng.randrange(8), rng.randrange(1, 30)
            if rng.random() < 0.7:
                assert a.allocate_slots(ta[i], n + len(ta[i]) * 4) == b.allocate_slots(tb[i], n + len(tb[i]) * 4)
            else:
                a.free(ta[i])
                b.free(tb[i])
            k = rng.randrange(12)
            assert a.lowest_free(k) == b.lowest_free(k)
    assert np.array_equal(a.lowest_free(3), b.lowest_free(3))
