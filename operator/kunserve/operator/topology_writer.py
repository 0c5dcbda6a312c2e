"""The operator's side of the serving topology contract (gateway/kunserve/gateway/topology.py documents it).

`build_topology` makes the document from the pool's replicas and groups (pure); `write_topology` stores it
under `kunserve:topology:{pool}` and publishes its epoch on `kunserve:topology:{pool}:events` in one
MULTI/EXEC, after checking (WATCH) that the stored document is not newer: epochs never go back, and
re-writing the same epoch (a resumed reconfiguration) is harmless.

Groups: every member of a cooperative group is a stage (role "stage", its index and layer range) and is
marked `entry: true`: each member accepts requests and forwards them to its leader while it keeps the
client's stream, so the requests' ownership (and so their KV once the group splits) stays spread over the
members. `groups[].entry` names the leader (stage 0), which schedules the group's requests.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import WatchError

from kunserve.operator.reconfig import FormedGroup

TOPOLOGY_KEY = "kunserve:topology:{pool}"  # the same strings as kunserve.gateway.topology (a test checks)
EVENTS_CHANNEL = "kunserve:topology:{pool}:events"
WRITE_ATTEMPTS = 5


class StaleTopologyError(RuntimeError):
    """Redis holds a topology with a newer epoch than the one being written."""


@dataclass(slots=True, frozen=True)
class ReplicaEndpoint:
    id: str
    endpoint: str  # host:port of the agent's gRPC server


def topology_key(pool: str) -> str:
    return TOPOLOGY_KEY.format(pool=pool)


def events_channel(pool: str) -> str:
    return EVENTS_CHANNEL.format(pool=pool)


def build_topology(*, epoch: int, model: str, replicas: Sequence[ReplicaEndpoint], groups: Sequence[FormedGroup],
                   num_layers: int | None, updated_at: float, draining: Collection[str] = ()) -> dict[str, Any]:
    """The topology document. Group members missing from `replicas` are an error (ValueError): a reader would
    reject the document. A standalone replica in `draining` is marked `entry: false`: no new request is routed to
    it while its streams finish (the autoscaler drains it before scale-in)."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    by_member: dict[str, tuple[FormedGroup, int]] = {}
    for g in groups:
        for index, stage in enumerate(g.stages):
            if stage.replica in by_member:
                raise ValueError(f"replica {stage.replica!r} is in groups {by_member[stage.replica][0].id!r} "
                                 f"and {g.id!r}")
            by_member[stage.replica] = (g, index)
    known = {r.id for r in replicas}
    missing = sorted(set(by_member) - known)
    if missing:
        raise ValueError(f"group members {missing} are not replicas of the pool")
    entries = []
    for r in replicas:
        found = by_member.get(r.id)
        if found is None:
            entries.append({"id": r.id, "endpoint": r.endpoint, "model": model, "group": None, "role": "replica",
                            "stage": None, "layer_start": 0 if num_layers else None, "layer_end": num_layers or None,
                            "entry": r.id not in draining})
        else:
            group, index = found
            stage = group.stages[index]
            entries.append({"id": r.id, "endpoint": r.endpoint, "model": model, "group": group.id, "role": "stage",
                            "stage": index, "layer_start": stage.layer_start, "layer_end": stage.layer_end,
                            "entry": True})
    return {
        "epoch": epoch,
        "model": model,
        "replicas": entries,
        "groups": [{"id": g.id, "members": list(g.members), "entry": g.leader} for g in groups],
        "updated_at": updated_at,
    }


def layout_of(doc: Mapping[str, Any]) -> tuple[Any, ...]:
    """What routing depends on: the model, each replica's endpoint, group and stage, and the groups (epoch, write
    time and a standalone replica's layer range, which only says "every layer", aside)."""
    replicas = []
    for r in doc.get("replicas") or []:
        if isinstance(r, Mapping):
            staged = r.get("group") is not None
            replicas.append((r.get("id"), r.get("endpoint"), r.get("group"), r.get("stage"), r.get("entry"),
                             r.get("layer_start") if staged else None, r.get("layer_end") if staged else None))
    groups = [(g.get("id"), tuple(g.get("members") or ()), g.get("entry"))
              for g in doc.get("groups") or [] if isinstance(g, Mapping)]
    return doc.get("model"), tuple(replicas), tuple(groups)


def same_layout(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Whether two documents route the same way (see layout_of)."""
    if a is None or b is None:
        return a is b
    return layout_of(a) == layout_of(b)


async def read_topology(redis: Redis, pool: str) -> dict[str, Any] | None:
    """The stored document (None when there is none or it is not a JSON object)."""
    raw = await redis.get(topology_key(pool))
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _epoch_of(raw: Any) -> int | None:
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        epoch = doc.get("epoch") if isinstance(doc, dict) else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


async def write_topology(redis: Redis, pool: str, doc: Mapping[str, Any]) -> None:
    """SET the document and PUBLISH its epoch in one transaction; StaleTopologyError if Redis holds a newer
    epoch. Retries (bounded) when the key changes between the check and the write."""
    epoch = int(doc["epoch"])
    key, payload = topology_key(pool), json.dumps(doc, separators=(",", ":"))
    for _attempt in range(WRITE_ATTEMPTS):
        async with redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                current = _epoch_of(await pipe.get(key))
                if current is not None and current > epoch:
                    await pipe.unwatch()
                    raise StaleTopologyError(f"{key} holds epoch {current}, newer than {epoch}")
                pipe.multi()
                pipe.set(key, payload)
                pipe.publish(events_channel(pool), str(epoch))
                await pipe.execute()
                return
            except WatchError:
                continue
    raise StaleTopologyError(f"{key} kept changing while writing epoch {epoch}")
