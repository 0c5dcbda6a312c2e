"""The topology contract (pure) and the static formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kunserve.gateway.topology import (
    GroupSpec,
    ReplicaSpec,
    Role,
    Topology,
    TopologyError,
    events_channel,
    parse_endpoint,
    parse_static,
    topology_key,
)
from kunserve.gateway.topology_source import load_static

DOC = {
    "epoch": 7, "model": "smollm2-135m", "updated_at": 1764079200.5,
    "replicas": [
        {"id": "agent-0", "endpoint": "10.0.0.5:50051", "model": "smollm2-135m", "group": None, "role": "replica",
         "stage": None, "layer_start": 0, "layer_end": 30, "entry": True},
        {"id": "agent-1", "endpoint": "10.0.0.6:50051", "model": "smollm2-135m", "group": "g-7-0", "role": "stage",
         "stage": 0, "layer_start": 0, "layer_end": 15, "entry": True},
        {"id": "agent-2", "endpoint": "10.0.0.7:50051", "model": "smollm2-135m", "group": "g-7-0", "role": "stage",
         "stage": 1, "layer_start": 15, "layer_end": 30, "entry": False},
    ],
    "groups": [{"id": "g-7-0", "members": ["agent-1", "agent-2"], "entry": "agent-1"}],
}


def test_the_document_round_trips_and_routes_to_group_entries() -> None:
    topo = Topology.from_json(json.dumps(DOC))
    assert topo.epoch == 7 and topo.model == "smollm2-135m" and len(topo.replicas) == 3
    assert topo.replicas[1] == ReplicaSpec("agent-1", "10.0.0.6:50051", "smollm2-135m", "g-7-0", Role.STAGE, 0, 0,
                                           15, True)
    assert topo.groups == (GroupSpec("g-7-0", ("agent-1", "agent-2"), "agent-1"),)
    assert [r.id for r in topo.routable()] == ["agent-0", "agent-1"]  # agent-2 is reached through agent-1
    assert json.loads(topo.to_json()) == DOC
    assert Topology.from_json(topo.to_json()) == topo


def test_every_member_marked_entry_takes_requests() -> None:
    """The operator marks every member of a group entry: each forwards to its leader and keeps the stream."""
    doc = json.loads(json.dumps(DOC))
    doc["replicas"][2]["entry"] = True
    assert [r.id for r in Topology.from_dict(doc).routable()] == ["agent-0", "agent-1", "agent-2"]
    assert topology_key("demo") == "kunserve:topology:demo"
    assert events_channel("demo") == "kunserve:topology:demo:events"


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.update(epoch=-1), "epoch"),
    (lambda d: d.update(epoch="7"), "epoch"),
    (lambda d: d["replicas"][0].update(endpoint="nohost"), "endpoint"),
    (lambda d: d["replicas"][0].update(role="leader"), "role"),
    (lambda d: d["replicas"][1].update(id="agent-0"), "unique"),
    (lambda d: d["groups"][0].update(entry="agent-0"), "entry"),
    (lambda d: d["groups"][0].update(members=["agent-1", "ghost"]), "ghost"),
    (lambda d: d["replicas"][2].update(group="g-other"), "group"),
    (lambda d: d.update(replicas={}), "replicas"),
])
def test_malformed_documents_are_refused(mutate: object, message: str) -> None:
    doc = json.loads(json.dumps(DOC))
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(TopologyError, match=message):
        Topology.from_dict(doc)
    with pytest.raises(TopologyError, match="JSON"):
        Topology.from_json("{nope")


def test_static_specifications(tmp_path: Path) -> None:
    topo = parse_static("agent-0=127.0.0.1:50051, agent-1=[::1]:50052", model="tiny")
    assert [(r.id, r.endpoint, r.model) for r in topo.replicas] == [
        ("agent-0", "127.0.0.1:50051", "tiny"), ("agent-1", "[::1]:50052", "tiny")]
    assert topo.epoch == 0 and topo.routable() == list(topo.replicas)
    assert [r.id for r in parse_static("127.0.0.1:1,127.0.0.1:2").replicas] == ["replica-0", "replica-1"]
    for bad in ("", "a=127.0.0.1", "a=:80", "a=h:99999", "a=h:1,a=h:2"):
        with pytest.raises(TopologyError):
            parse_static(bad)
    assert parse_endpoint("[::1]:50052") == ("[::1]", 50052)
    path = tmp_path / "topology.yaml"
    path.write_text("replicas:\n  - {id: a, endpoint: '127.0.0.1:7001'}\n  - {id: b, endpoint: '127.0.0.1:7002'}\n")
    from_file = load_static(str(path), model="tiny")
    assert [r.id for r in from_file.routable()] == ["a", "b"] and from_file.model == "tiny"
    assert load_static("a=127.0.0.1:7001").replicas[0].endpoint == "127.0.0.1:7001"
    with pytest.raises(TopologyError):
        load_static(str(tmp_path / "missing.yaml"))
