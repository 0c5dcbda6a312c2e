"""Reconfigurations as values (spec checks, status round trips, group bookkeeping) and the controller's decisions."""

from __future__ import annotations

import pytest

from kunserve.operator.agent_client import AgentRole, AgentStatus
from kunserve.operator.controller import cost_from_statuses, decide, next_epoch, replica_names, with_groups
from kunserve.operator.plan_types import GroupPhase, PoolSpec, StagePlan
from kunserve.operator.reconfig import (
    Action,
    FormedGroup,
    GroupChange,
    InvalidReconfiguration,
    MemberOutcome,
    ReconfigPhase,
    ReconfigRecord,
    ReconfigSpec,
    apply_committed,
    check_drop,
    groups_from_status,
    parse_rfc3339,
    reconfiguration_name,
    resolve_restore,
    rfc3339,
)
from tests.deploy.crd_tools import EXAMPLES_DIR, load_one
from tests.operator_unit.pools import HAND, rep

STAGES = (StagePlan("a-0", 0, 15), StagePlan("a-1", 15, 30))


def drop_cr(**changes: object) -> dict[str, object]:
    spec: dict[str, object] = {"pool": "p", "epoch": 3, "action": "Drop", "groups": [
        {"id": "g1", "members": ["a-0", "a-1"], "stages": [s.to_dict() for s in STAGES]}]}
    spec.update(changes)
    return spec


def test_the_examples_parse_and_round_trip() -> None:
    drop = ReconfigSpec.from_cr_spec(load_one(EXAMPLES_DIR / "reconfiguration-drop.yaml")["spec"])
    assert (drop.pool, drop.epoch, drop.action, drop.manual) == ("smollm2", 1, Action.DROP, True)
    assert drop.groups[0].ranges() == ((0, 15), (15, 30)) and drop.groups[0].leader == "smollm2-agent-0"
    assert ReconfigSpec.from_cr_spec(drop.to_cr_spec()) == drop
    restore = ReconfigSpec.from_cr_spec(load_one(EXAMPLES_DIR / "reconfiguration-restore.yaml")["spec"])
    assert restore.action is Action.RESTORE and restore.epoch == 2


@pytest.mark.parametrize(("changes", "message"), [
    ({"epoch": 0}, "spec.epoch: must be between 1"),
    ({"action": "Shuffle"}, "spec.action: must be one of ['Drop', 'Restore']"),
    ({"groups": []}, "spec.groups: needs at least one group"),
    ({"pool": "Bad_Name"}, "spec.pool"),
    ({"groups": [{"id": "g1", "members": ["a-0"], "stages": [{"replica": "a-0", "layerStart": 0, "layerEnd": 30}]}]},
     "a Drop needs at least 2 members"),
    ({"groups": [{"id": "g1", "members": ["a-0", "a-1"]}]}, "exactly one stage per member"),
    ({"groups": [{"id": "g1", "members": ["a-0", "a-1"], "stages": [
        {"replica": "a-0", "layerStart": 0, "layerEnd": 10}, {"replica": "a-1", "layerStart": 12, "layerEnd": 30}]}]},
     "contiguous"),
    ({"groups": [{"id": "g1", "members": ["a-0", "a-1"], "stages": [
        {"replica": "a-1", "layerStart": 0, "layerEnd": 10}, {"replica": "a-0", "layerStart": 10, "layerEnd": 30}]}]},
     "in the members' order"),
    ({"groups": [{"id": "g1", "members": ["a-0", "a-1"], "stages": [s.to_dict() for s in STAGES]},
                 {"id": "g2", "members": ["a-1", "a-2"], "stages": [
                     {"replica": "a-1", "layerStart": 0, "layerEnd": 1},
                     {"replica": "a-2", "layerStart": 1, "layerEnd": 30}]}]}, "'a-1' is in two groups"),
])
def test_invalid_specs_name_the_problem(changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidReconfiguration, match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        ReconfigSpec.from_cr_spec(drop_cr(**changes))
    assert ReconfigSpec.from_cr_spec(drop_cr()).problems(num_layers=30) == []
    assert "must end at the model's 32 layers" in str(ReconfigSpec.from_cr_spec(drop_cr()).problems(num_layers=32)[0])


def test_records_round_trip_through_the_status() -> None:
    record = ReconfigRecord(phase=ReconfigPhase.COMMITTED, message="m", attempts=2, started_at=1764079200.25,
                            prepared_at=1764079200.5, committed_at=1764079201.0, committed_groups=("g1",),
                            members=(MemberOutcome("a-0", 0, 15, 800, 0.25, 3),))
    status = record.to_status()
    assert status["timings"] == {"startedAt": "2025-11-25T14:00:00.250Z", "preparedAt": "2025-11-25T14:00:00.500Z",
                                 "committedAt": "2025-11-25T14:00:01.000Z", "prepareSeconds": 0.25,
                                 "commitSeconds": 0.5}
    back = ReconfigRecord.from_status(status)
    assert back == record and ReconfigRecord.from_json(record.to_json()) == record
    assert ReconfigRecord.from_status(None) == ReconfigRecord() and not ReconfigRecord().terminal
    assert ReconfigRecord.from_status({"phase": "Nonsense"}).phase is ReconfigPhase.PENDING
    assert parse_rfc3339(rfc3339(5.5)) == 5.5 and parse_rfc3339("garbage") is None


def test_groups_follow_committed_reconfigurations_idempotently() -> None:
    drop = ReconfigSpec.from_cr_spec(drop_cr())
    groups = apply_committed((), drop, ["g1"], "p-drop-3")
    assert groups == (FormedGroup("g1", STAGES, 3, "p-drop-3"),)
    assert apply_committed(groups, drop, ["g1"], "p-drop-3") == groups  # applied twice is once
    assert groups_from_status([g.to_status() for g in groups]) == groups
    assert apply_committed(groups, drop, [], "x") == groups  # nothing committed, nothing changes
    restore = ReconfigSpec("p", 4, Action.RESTORE, (GroupChange("g1", ("a-0", "a-1")),))
    assert resolve_restore(restore, groups).groups[0].stages == STAGES  # stages from the pool's record
    assert apply_committed(groups, restore, ["g1"]) == ()
    with pytest.raises(InvalidReconfiguration, match="'g9' is not formed"):
        resolve_restore(ReconfigSpec("p", 4, Action.RESTORE, (GroupChange("g9", ("a-0", "a-1")),)), groups)
    with pytest.raises(InvalidReconfiguration, match="has members"):
        resolve_restore(ReconfigSpec("p", 4, Action.RESTORE, (GroupChange("g1", ("a-1", "a-0")),)), groups)
    with pytest.raises(InvalidReconfiguration, match="already a member of group 'g1'"):
        check_drop(drop, ["a-0", "a-1"], groups)
    with pytest.raises(InvalidReconfiguration, match="'a-1' is not a replica"):
        check_drop(drop, ["a-0"], ())
    with pytest.raises(ValueError, match="malformed group"):
        groups_from_status([{"id": "g1"}])
    assert reconfiguration_name("p", Action.RESTORE, 7) == "p-restore-7"


def test_decide_drops_first_then_restores_and_keeps_the_windows() -> None:
    spec = PoolSpec(drop_demand=0.9, restore_demand=0.5, restore_window_s=10, max_group_size=2)
    pressures = [rep("r0", 150, waiting=3), rep("r1", 10), rep("r2", 5), rep("r3", 5)]
    decision, carried = decide(pressures, (), model="m", spec=spec, cost=HAND, now=0.0, low_since={})
    assert decision is not None and decision.action is Action.DROP
    assert decision.group.members == ("r0", "r2") and decision.group.ranges() == ((0, 2), (2, 4))
    cr = decision.spec("p", 5).to_cr_spec()
    assert cr["pressure"][0] == {"replica": "r0", "demand": 1.5, "blocksNeeded": 150, "blocksTotal": 100,
                                 "numWaiting": 3, "numRunning": 5}
    # r0 and r2 formed g: the pool's record marks them grouped even if their reports lag behind.
    formed = (FormedGroup("g", decision.group.stages, 5),)
    assert [p.group for p in with_groups(pressures, formed)] == ["g", None, "g", None]
    low = [rep("r0", 10, pool=10000, total=250, group="g", home=10), rep("r1", 10),
           rep("r2", 5, pool=10000, total=250, group="g", home=5), rep("r3", 5)]
    decision, carried = decide(low, formed, model="m", spec=spec, cost=HAND, now=100.0, low_since={})
    assert decision is None and carried == {"g": 100.0}  # low, but not for the window yet
    decision, carried = decide(low, formed, model="m", spec=spec, cost=HAND, now=110.0, low_since=carried)
    assert decision is not None and decision.action is Action.RESTORE and decision.group.id == "g"
    assert FormedGroup("g", STAGES, 1).to_active("m").phase is GroupPhase.COOPERATIVE


def test_epochs_names_and_cost_from_an_agents_status() -> None:
    assert next_epoch(4) == 5 and next_epoch(4, [2, 9]) == 10
    assert replica_names("p", 2) == ["p-agent-0", "p-agent-1"]

    def status(start: int, end: int, weights: int, block_bytes: int, agent: str = "a") -> AgentStatus:
        return AgentStatus(agent_id=agent, model="m", num_layers=4, layer_start=start, layer_end=end, block_size=2,
                           kv_blocks_total=100, kv_blocks_free=100, kv_block_bytes=block_bytes, weight_bytes=weights,
                           memory_budget_bytes=0, epoch=0, role=AgentRole.REPLICA, device="cpu", group=(),
                           prepared_epoch=0)

    cost = cost_from_statuses([status(2, 4, 2100, 40, "b"), status(0, 4, 4000, 80, "z")])
    assert cost is not None and (cost.num_layers, cost.layer_bytes, cost.kv_bytes_per_token_layer,
                                 cost.block_size) == (4, 1000, 10, 2)  # the full replica is preferred
    assert cost_from_statuses([]) is None


def test_the_daemon_keeps_a_bounded_history(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    from types import SimpleNamespace

    from kunserve.operator import pressure_daemon

    deleted: list[str] = []

    class Api:
        async def delete(self, kind: object, namespace: str, name: str) -> bool:
            deleted.append(name)
            return True

    monkeypatch.setattr(pressure_daemon, "KEEP_RECONFIGURATIONS", 2)
    daemon = pressure_daemon.PoolDaemon(SimpleNamespace(api=Api()), "ns", "p", None)  # type: ignore[arg-type]
    finished = [{"metadata": {"name": f"p-drop-{e}"}, "spec": {"epoch": e}} for e in (3, 1, 4, 2)]
    asyncio.run(daemon.prune(finished))
    assert deleted == ["p-drop-1", "p-drop-2"]
