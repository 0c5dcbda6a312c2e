"""The soak's 3-minute profile (bench/soak): mixed OpenAI traffic through the gateway while a seeded chaos
schedule drops and restores groups, SIGKILLs agents, restarts Redis and the controller; every invariant of
the report must hold at the end (bench/soak/invariants.py lists them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.soak import invariants
from bench.soak.chaos import ChaosKind, ChaosRates, schedule
from bench.soak.cluster import Pod
from bench.soak.invariants import EpochMonitor, slope_mib_per_min
from bench.soak.run import SoakConfig, main, run_soak
from kunserve.rpc.v1 import agent_pb2

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


@dataclass(slots=True)
class _Proc:
    running: bool

    def poll(self) -> int | None:
        return None if self.running else -9


class _Agents:
    """Just enough of a Cluster for the EpochMonitor: one agent pod whose restarts reuse its pid."""

    def __init__(self) -> None:
        self.pods = {"a": Pod(name="a", kind="agent", start=lambda: None)}  # type: ignore[arg-type,return-value]
        self.endpoints = {"a": "127.0.0.1:1"}

    def redis_client(self) -> None:
        raise ConnectionError("no redis in this test")


def test_epoch_monitor_tells_processes_apart_by_incarnation_not_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = _Agents()
    pod = cluster.pods["a"]
    answers: list[tuple[int, int | None]] = []  # (epoch it reports, pid the supervisor starts during the call)

    def status(endpoint: str) -> agent_pb2.StatusResponse:
        epoch, restart_as = answers.pop(0)
        if restart_as is not None:
            pod.pids.append(restart_as)
        return agent_pb2.StatusResponse(epoch=epoch)

    monkeypatch.setattr(invariants, "agent_status", status)
    monitor = EpochMonitor(cluster)  # type: ignore[arg-type]
    pod.pids.append(100)
    pod.proc = _Proc(running=True)  # type: ignore[assignment]
    answers += [(5, None), (7, None), (7, 100), (0, None), (3, None)]
    for _ in range(5):
        monitor.sample()
    # a restart during the call (the answer's process unknown), then the same pid again (reused): no violation
    assert monitor.violations == []
    pod.proc = _Proc(running=False)  # type: ignore[assignment]
    answers += [(0, None)]
    monitor.sample()  # killed; its new process answers before the supervisor counts it: skipped
    assert monitor.violations == [] and answers == [(0, None)]
    pod.proc = _Proc(running=True)  # type: ignore[assignment]
    monitor.sample()  # the same process went back: 3 -> 0
    assert monitor.violations == ["a (pid 100) epoch went back: 3 -> 0"]


def test_three_minutes_of_chaos_lose_and_leak_nothing(tiny_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "soak.json"
    report = run_soak(SoakConfig(model=tiny_dir, duration_s=180, seed=SEED, rates=PROFILE, workdir=tmp_path / "run",
                                 out=out))
    with capsys.disabled():  # the report goes to make test's output, pass or fail
        print(f"\n3-minute soak (seed {SEED}): {'every invariant held' if report.ok else 'FAILED'}\n{report.text()}")
    assert report.ok, report.text()
    facts = json.loads(out.read_text())["report"]["facts"]
    assert facts["attempts"]["ok"] > 100, facts
    assert sum(facts["chaos events"].values()) >= 10, facts


def test_a_missing_checkpoint_is_a_usage_error_naming_the_fix(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tmp_path / "tiny"), "--duration", "1"])
    assert exc.value.code == 2
    assert "kunserve make-model" in capsys.readouterr().err
