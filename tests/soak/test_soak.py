"""The soak's 3-minute profile (bench/soak): mixed OpenAI traffic through the gateway while a seeded chaos
schedule drops and restores groups, SIGKILLs agents, restarts Redis and the controller; every invariant of
the report must hold at the end (bench/soak/invariants.py lists them)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.soak.chaos import ChaosKind, ChaosRates, schedule
from bench.soak.invariants import slope_mib_per_min
from bench.soak.run import SoakConfig, run_soak

SEED = 7
PROFILE = ChaosRates(drop=3.0, restore=3.0, kill_agent=1.0, restart_redis=0.7, restart_controller=0.7)


def test_the_schedule_is_seeded_and_covers_every_kind() -> None:
    a, b = schedule(SEED, 180, PROFILE, quiet_tail_s=10), schedule(SEED, 180, PROFILE, quiet_tail_s=10)
    assert [(e.at_s, e.kind) for e in a] == [(e.at_s, e.kind) for e in b]
    assert {e.kind for e in a} == set(ChaosKind)
    assert all(e.at_s < 170 for e in a)
    assert schedule(SEED + 1, 180, PROFILE) != a


def test_rss_slope() -> None:
    assert slope_mib_per_min([(60.0 * i, 1024 * (100 + 2 * i)) for i in range(6)]) == 2.0
    assert slope_mib_per_min([(1.0, 1), (2.0, 1)]) is None


def test_three_minutes_of_chaos_lose_and_leak_nothing(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    report = run_soak(SoakConfig(model=tiny_dir, duration_s=180, seed=SEED, rates=PROFILE, workdir=tmp_path / "run",
                                 out=out))
    assert report.ok, report.text()
    facts = json.loads(out.read_text())["report"]["facts"]
    assert facts["attempts"]["ok"] > 100, facts
    assert sum(facts["chaos events"].values()) >= 10, facts
