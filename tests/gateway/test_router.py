"""The routing policy (pure), API-key loading, and the gateway's import hygiene."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kunserve.gateway.auth import ApiKeyError, KeyChecker, load_api_keys
from kunserve.gateway.errors import ServiceUnavailableError
from kunserve.gateway.replicas import Health
from kunserve.gateway.router import ReplicaView, rank
from tests.integration.agent_process import REPO, SOURCE_ROOTS


def v(rid: str, health: Health = Health.UP, demand: float = 0.0, queue: int = 0, inflight: int = 0) -> ReplicaView:
    return ReplicaView(rid, health, demand, queue, inflight)


def test_least_pressured_first_then_shorter_queue_then_fewer_in_flight() -> None:
    views = [v("a", demand=0.7), v("b", demand=0.2), v("c", demand=0.2, inflight=3), v("d", demand=0.2, queue=1)]
    assert [x.id for x in rank(views, max_queue=4)] == ["b", "c", "d", "a"]  # demand, then queue, then in-flight
    assert [x.id for x in rank([v("a", demand=0.2, queue=1), v("b", demand=0.2, inflight=5)], 4)] == ["b", "a"]


def test_full_queues_down_and_excluded_replicas_do_not_admit() -> None:
    views = [v("full", queue=2), v("down", Health.DOWN), v("ok", demand=3.0), v("failed")]
    assert [x.id for x in rank(views, max_queue=2, exclude=frozenset({"failed"}))] == ["ok"]
    assert rank([v("full", queue=2), v("down", Health.DOWN)], max_queue=2) == []


def test_unknown_or_stale_pressure_ranks_after_fresh() -> None:
    views = [v("stale", Health.STALE), v("unknown", Health.UNKNOWN), v("fresh", demand=0.9)]
    assert [x.id for x in rank(views, max_queue=8)] == ["fresh", "stale", "unknown"]


def test_requests_count_until_a_pressure_message_reflects_them() -> None:
    from kunserve.gateway.replicas import ReplicaRegistry, ReplicaState
    from kunserve.gateway.router import Router
    from kunserve.gateway.topology import ReplicaSpec, Topology
    from kunserve.rpc.v1 import agent_pb2

    registry = ReplicaRegistry()
    registry.topology = Topology(replicas=(ReplicaSpec("a", "127.0.0.1:1"),))
    state = registry.replicas["a"] = ReplicaState(registry.topology.replicas[0], channel=None)
    router = Router(registry, max_queue=2, stale_after_s=60, retry_after_s=1)
    state.on_pressure(agent_pb2.Pressure(blocks_total=100, blocks_needed=10, demand=0.1, num_waiting=1))
    with router.lease(state, prompt_tokens=63):  # 4 blocks of 16
        (view,) = router.views()
        assert (view.queue, view.inflight, round(view.demand, 2)) == (2, 1, 0.14)
        with pytest.raises(ServiceUnavailableError, match="queue full"):
            router.pick()
    assert router.views()[0].queue == 1 and router.pick() is state  # finished before any sample: not counted
    with router.lease(state, prompt_tokens=15):
        state.on_pressure(agent_pb2.Pressure(blocks_total=100, blocks_needed=11, demand=0.11, num_running=1))
    (view,) = router.views()  # the sample saw it; its end does not make the count negative
    assert (view.queue, view.inflight, view.demand) == (0, 0, 0.11)


def test_api_keys_from_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# comment\n\nk-file-1\n  k-file-2  \n")
    keys = load_api_keys(path, {"KUNSERVE_API_KEYS": "k-env-1, ,k-env-2"})
    assert keys == {"k-file-1", "k-file-2", "k-env-1", "k-env-2"}
    assert load_api_keys(None, {}) == frozenset()
    with pytest.raises(ApiKeyError) as err:
        load_api_keys(tmp_path / "missing", {})
    assert "k-file" not in str(err.value)
    checker = KeyChecker(keys)
    assert checker.check("Bearer k-env-2") and checker.check("bearer k-file-1")
    assert not checker.check(None) and not checker.check("Bearer nope") and not checker.check("k-file-1")
    assert not checker.check("Basic k-file-1") and not checker.check("Bearer ")
    assert KeyChecker(frozenset()).check(None)  # auth off


def test_the_gateway_never_imports_torch() -> None:
    code = (
        "import pkgutil, importlib, sys\n"
        "import kunserve.gateway as g\n"
        "names = [m.name for m in pkgutil.iter_modules(g.__path__, 'kunserve.gateway.')]\n"
        "[importlib.import_module(n) for n in names]\n"
        "from kunserve.cli import build_parser\n"
        "build_parser('gateway')\n"
        "assert len(names) >= 10, names\n"
        "bad = sorted(m for m in sys.modules\n"
        "             if m == 'torch' or m.startswith('torch.') or m == 'kunserve.rpc.tensors')\n"
        "assert not bad, bad\n"
        "print(len(names))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={"PYTHONPATH": SOURCE_ROOTS, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) >= 10
