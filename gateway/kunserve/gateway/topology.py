"""The serving topology contract between the operator (writer) and gateways / agents (readers).

Storage (Redis)
---------------
- key ``kunserve:topology:{pool}`` holds one JSON document, the current topology of pool ``{pool}``;
- channel ``kunserve:topology:{pool}:events`` carries a message each time the document changes; the
  message is the new epoch as a decimal string. A reader re-reads the key on every message (the message
  is a wake-up, not the data) and ignores documents whose epoch is not newer than the one it holds, so
  out-of-order or duplicate events are harmless. A reader that (re)subscribes re-reads the key once.

The writer sets the key first, then publishes (``SET`` + ``PUBLISH``, ideally in one MULTI/EXEC).

The document
------------
::

    {
      "epoch": 7,                      # int >= 0, strictly increasing per pool
      "model": "smollm2-135m",         # model served by the pool
      "replicas": [
        {"id": "agent-0",              # unique in the pool
         "endpoint": "10.0.0.5:50051", # host:port of the agent's gRPC server (Inference + Agent)
         "model": "smollm2-135m",
         "group": null,                # id of the cooperative group it belongs to, or null
         "role": "replica",            # "replica": holds every layer, serves alone;
                                       # "stage": one pipeline stage of a group
         "stage": null,                # stage index inside its group (0 = first), or null
         "layer_start": 0, "layer_end": 30,   # decoder layers held, [start, end)
         "entry": true},               # takes requests: a standalone replica, or a member of a group that
                                       # accepts them (it forwards them to its leader, keeps the stream)
        ...
      ],
      "groups": [
        {"id": "g-7-0", "members": ["agent-1", "agent-2"], "entry": "agent-1"}
      ],
      "updated_at": 1764079200.5       # unix seconds of the write
    }

Routing rule: requests go to every replica marked ``entry`` and to each group's entry member (its leader,
stage 0). The operator marks every member of a group ``entry``: a member forwards what it gets to its
leader and keeps the client's stream, so the requests — and their KV once the group splits — stay spread
over the members. A member marked ``entry: false`` is a pipeline stage reached only through the entry.

This module is pure (no I/O): the dataclasses, JSON (de)serialisation, validation, and the static
topology formats a gateway accepts when there is no operator (``agent-0=host:port,agent-1=host:port`` or
a YAML/JSON file with the same shape as the document, where only ``replicas[].id`` and ``endpoint`` are
required).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

TOPOLOGY_KEY = "kunserve:topology:{pool}"
EVENTS_CHANNEL = "kunserve:topology:{pool}:events"


class TopologyError(ValueError):
    """A topology document or static specification is malformed; the message says where."""


class Role(StrEnum):
    REPLICA = "replica"
    STAGE = "stage"


@dataclass(slots=True, frozen=True)
class ReplicaSpec:
    id: str
    endpoint: str  # host:port of the agent's gRPC server
    model: str = ""
    group: str | None = None
    role: Role = Role.REPLICA
    stage: int | None = None
    layer_start: int | None = None
    layer_end: int | None = None
    entry: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "endpoint": self.endpoint, "model": self.model, "group": self.group,
                "role": self.role.value, "stage": self.stage, "layer_start": self.layer_start,
                "layer_end": self.layer_end, "entry": self.entry}


@dataclass(slots=True, frozen=True)
class GroupSpec:
    id: str
    members: tuple[str, ...]
    entry: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "members": list(self.members), "entry": self.entry}


@dataclass(slots=True, frozen=True)
class Topology:
    epoch: int = 0
    model: str = ""
    replicas: tuple[ReplicaSpec, ...] = ()
    groups: tuple[GroupSpec, ...] = ()
    updated_at: float = field(default=0.0)

    def routable(self) -> list[ReplicaSpec]:
        """Replicas that take requests: those marked entry, and each group's entry member."""
        entries = {g.entry for g in self.groups}
        return [r for r in self.replicas if r.entry or r.id in entries]

    def replica(self, replica_id: str) -> ReplicaSpec | None:
        return next((r for r in self.replicas if r.id == replica_id), None)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "model": self.model, "replicas": [r.to_dict() for r in self.replicas],
                "groups": [g.to_dict() for g in self.groups], "updated_at": self.updated_at}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Topology:
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TopologyError(f"topology is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> Topology:
        """Parse and validate a document (see the module docstring); raises TopologyError."""
        if not isinstance(raw, Mapping):
            raise TopologyError("topology must be a JSON object")
        epoch = _int(raw.get("epoch", 0), "epoch", minimum=0)
        replicas = tuple(_replica(r, i) for i, r in enumerate(_list(raw.get("replicas", []), "replicas")))
        groups = tuple(_group(g, i) for i, g in enumerate(_list(raw.get("groups", []), "groups")))
        topo = cls(epoch=epoch, model=_str(raw.get("model", ""), "model"), replicas=replicas, groups=groups,
                   updated_at=_float(raw.get("updated_at", 0.0), "updated_at"))
        topo.validate()
        return topo

    def validate(self) -> None:
        ids = [r.id for r in self.replicas]
        if len(set(ids)) != len(ids):
            raise TopologyError(f"replica ids must be unique: {ids}")
        by_id = {r.id: r for r in self.replicas}
        group_ids = [g.id for g in self.groups]
        if len(set(group_ids)) != len(group_ids):
            raise TopologyError(f"group ids must be unique: {group_ids}")
        for g in self.groups:
            if g.entry not in g.members:
                raise TopologyError(f"group {g.id}: entry {g.entry!r} is not one of its members")
            for m in g.members:
                if m not in by_id:
                    raise TopologyError(f"group {g.id}: member {m!r} is not a replica")
                if by_id[m].group != g.id:
                    raise TopologyError(f"group {g.id}: replica {m!r} has group {by_id[m].group!r}")
        known = set(group_ids)
        for r in self.replicas:
            if r.group is not None and r.group not in known:
                raise TopologyError(f"replica {r.id}: unknown group {r.group!r}")


def topology_key(pool: str) -> str:
    return TOPOLOGY_KEY.format(pool=pool)


def events_channel(pool: str) -> str:
    return EVENTS_CHANNEL.format(pool=pool)


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split host:port (IPv6 hosts in brackets); raises TopologyError."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TopologyError(f"endpoint must be host:port, got {endpoint!r}")
    return host, int(port)


def parse_static(spec: str, model: str = "") -> Topology:
    """`agent-0=127.0.0.1:50051,agent-1=127.0.0.1:50052` -> a topology of standalone replicas, epoch 0."""
    replicas = []
    for i, item in enumerate(p.strip() for p in spec.split(",")):
        if not item:
            continue
        rid, sep, endpoint = item.partition("=")
        if not sep:  # a bare endpoint: name it by position
            rid, endpoint = f"replica-{i}", item
        replicas.append(_replica({"id": rid.strip(), "endpoint": endpoint.strip(), "model": model}, i))
    if not replicas:
        raise TopologyError("a static topology needs at least one id=host:port")
    topo = Topology(epoch=0, model=model, replicas=tuple(replicas), updated_at=time.time())
    topo.validate()
    return topo


def _replica(raw: Any, index: int) -> ReplicaSpec:
    where = f"replicas[{index}]"
    if not isinstance(raw, Mapping):
        raise TopologyError(f"{where} must be an object")
    rid = _str(raw.get("id"), f"{where}.id")
    if not rid:
        raise TopologyError(f"{where}.id must be a non-empty string")
    endpoint = _str(raw.get("endpoint"), f"{where}.endpoint")
    parse_endpoint(endpoint)
    try:
        role = Role(raw.get("role", "replica"))
    except ValueError:
        raise TopologyError(f"{where}.role must be 'replica' or 'stage', got {raw.get('role')!r}") from None
    group = raw.get("group")
    if group is not None:
        group = _str(group, f"{where}.group")
    entry = raw.get("entry", True)
    if not isinstance(entry, bool):
        raise TopologyError(f"{where}.entry must be a boolean")
    return ReplicaSpec(
        id=rid, endpoint=endpoint, model=_str(raw.get("model", ""), f"{where}.model"), group=group, role=role,
        stage=_opt_int(raw.get("stage"), f"{where}.stage"), layer_start=_opt_int(raw.get("layer_start"),
        f"{where}.layer_start"), layer_end=_opt_int(raw.get("layer_end"), f"{where}.layer_end"), entry=entry)


def _group(raw: Any, index: int) -> GroupSpec:
    where = f"groups[{index}]"
    if not isinstance(raw, Mapping):
        raise TopologyError(f"{where} must be an object")
    members = tuple(_str(m, f"{where}.members[]") for m in _list(raw.get("members", []), f"{where}.members"))
    if not members:
        raise TopologyError(f"{where}.members must be non-empty")
    return GroupSpec(id=_str(raw.get("id"), f"{where}.id"), members=members, entry=_str(raw.get("entry"),
                     f"{where}.entry"))


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise TopologyError(f"{where} must be a string, got {value!r}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise TopologyError(f"{where} must be a list")
    return value


def _int(value: Any, where: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TopologyError(f"{where} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise TopologyError(f"{where} must be >= {minimum}, got {value}")
    return value


def _opt_int(value: Any, where: str) -> int | None:
    return None if value is None else _int(value, where, minimum=0)


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TopologyError(f"{where} must be a number, got {value!r}")
    return float(value)
