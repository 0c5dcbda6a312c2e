"""The burst benchmark's harness on a very short workload, every policy, the tiny model: the report is complete
and every request finished (benchmarks assert no timing)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.burst import main
from bench.policies import Policy
from bench.workload import BurstShape, Lengths, Phase, generate


def test_workload_is_seeded_and_shaped() -> None:
    shape = BurstShape(calm_s=5, burst_s=5, after_s=5, base_rate=1, peak_factor=10, cv=3)
    a, b = generate(shape, Lengths(), 7), generate(shape, Lengths(), 7)
    assert a == b and a != generate(shape, Lengths(), 8)
    by = {p: [i for i in a if i.phase is p] for p in Phase}
    assert len(by[Phase.BURST]) > len(by[Phase.CALM]) + len(by[Phase.AFTER])
    assert all(0 <= i.arrival_s < 15 for i in a) and [i.arrival_s for i in a] == sorted(i.arrival_s for i in a)


def test_every_policy_runs_the_workload_to_the_end(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "burst.json"
    report = main(["--model", str(tiny_dir), "--agents", "2", "--calm", "0.5", "--burst", "1.5", "--after", "0.5",
                   "--rate", "2", "--peak-factor", "5", "--kv-blocks", "10", "--prompt-median", "30", "--prompt-max",
                   "96", "--output-median", "12", "--output-max", "24", "--group-size", "2", "--restore-window", "0.5",
                   "--out", str(out)])
    assert json.loads(out.read_text())["policies"].keys() == {p.value for p in Policy}
    assert out.with_suffix(".png").stat().st_size > 0
    n = report["workload"]["requests"]
    assert n > 0
    for name, s in report["policies"].items():
        assert s["requests"] == s["finished"] == n, name
        for key in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_p50_s", "queue_p99_s", "slo_attainment",
                    "throughput_tokens_s"):
            assert s[key] == s[key], f"{name}: {key} is nan"
        assert report["ratios_vs_kunserve"][name]["ttft_p99_s"] > 0
        requests = report["runs"][name]["requests"]
        assert all(len(r["token_times"]) == r["output_len"] and not r["error"] for r in requests)
