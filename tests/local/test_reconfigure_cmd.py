"""`kunserve reconfigure` straight on agents (fake ones here): a drop exactly where asked, then a restore."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from kunserve.cli import SUBCOMMANDS, main
from kunserve.rpc.v1 import agent_pb2
from tests.operator_unit.fake_agent import FakeAgentsThread


@pytest.fixture
def fakes() -> Iterator[FakeAgentsThread]:
    with FakeAgentsThread(("a0", "a1")) as agents:
        yield agents


def test_subcommands_are_registered() -> None:
    assert SUBCOMMANDS["up"][0] == "kunserve.operator.up_cmd"
    assert SUBCOMMANDS["reconfigure"][0] == "kunserve.operator.reconfigure_cmd"


def test_drop_and_restore_on_agents(fakes: FakeAgentsThread, capsys: pytest.CaptureFixture[str]) -> None:
    agents = ",".join(f"{a}={e}" for a, e in fakes.endpoints().items())
    assert main(["reconfigure", "drop", "--agents", agents, "--ranges", "0:3,3:4", "--group", "g1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["name"], result["status"]["phase"], result["spec"]["groups"][0]["id"]) == (
        "manual-drop-1", "Completed", "g1")
    a0, a1 = fakes.agents["a0"], fakes.agents["a1"]
    assert (a0.layer_end, a1.layer_start, a0.role) == (3, 3, agent_pb2.ROLE_LEADER)

    assert main(["reconfigure", "restore", "--agents", f"a1={a1.endpoint}"]) == 0
    assert "manual-restore-2: Completed" in capsys.readouterr().out
    assert (a0.role, a1.role, a0.epoch) == (agent_pb2.ROLE_REPLICA, agent_pb2.ROLE_REPLICA, 2)

    a0.fail_prepare = "FAILED_PRECONDITION"
    assert main(["reconfigure", "drop", "--agents", agents]) == 1  # rolled back: exit status 1
    assert "RolledBack" in capsys.readouterr().out


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reconfigure", "drop", "--agents", "nonsense"]) == 2
    assert "id=host:port" in capsys.readouterr().err
    assert main(["reconfigure", "status", "--agents", "a=127.0.0.1:1"]) == 2
