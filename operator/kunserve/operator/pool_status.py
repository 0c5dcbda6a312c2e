"""The ServingPool's status as a pure function of its spec's validity, its agents' StatefulSet and the
status it has now.

Ownership of status fields (so the writers never fight; every write is a merge patch of its own fields):

- this module (ServingPool and StatefulSet handlers): phase, observedGeneration, replicas, readyReplicas,
  selector and the Ready condition; it also initialises epoch (0), groups ([]) and groupCount (0) once;
- the Reconfiguration executor (to come): epoch, groups, groupCount, lastReconfiguration, modelLayers and
  the Reconfiguring condition. While that condition is True the phase reads Reconfiguring.

conditions is one list (a merge patch replaces lists), so each writer carries over the conditions it does
not own, and the patch carries the pool's resourceVersion: a concurrent write makes it fail (409) and the
writer recomputes from the fresh object.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kunserve.operator.naming import selector_string

READY = "Ready"
RECONFIGURING = "Reconfiguring"


class PoolPhase(StrEnum):
    PENDING = "Pending"
    READY = "Ready"
    DEGRADED = "Degraded"
    RECONFIGURING = "Reconfiguring"
    FAILED = "Failed"


class ReadyReason(StrEnum):
    INVALID_SPEC = "InvalidSpec"
    NO_REPLICA_READY = "NoReplicaReady"
    PARTIALLY_READY = "PartiallyReady"
    ALL_REPLICAS_READY = "AllReplicasReady"


@dataclass(slots=True, frozen=True)
class WorkloadStatus:
    """What the agents' StatefulSet reports (status.replicas / readyReplicas); zeros before it exists."""

    replicas: int = 0
    ready_replicas: int = 0

    @classmethod
    def from_statefulset(cls, sts: Mapping[str, Any] | None) -> WorkloadStatus:
        status = (sts or {}).get("status") or {}
        return cls(replicas=int(status.get("replicas") or 0), ready_replicas=int(status.get("readyReplicas") or 0))


def timestamp(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition_status(conditions: Sequence[Mapping[str, Any]], kind: str) -> str | None:
    for cond in conditions:
        if cond.get("type") == kind:
            return str(cond.get("status"))
    return None


def set_condition(conditions: Sequence[Mapping[str, Any]], kind: str, status: bool, reason: str, message: str,
                  generation: int, now: datetime.datetime) -> list[dict[str, Any]]:
    """conditions with `kind` set (metav1.Condition shape); lastTransitionTime moves only when status does."""
    value = "True" if status else "False"
    out: list[dict[str, Any]] = []
    found = False
    for cond in conditions:
        if cond.get("type") != kind:
            out.append(dict(cond))
            continue
        found = True
        moved = cond.get("status") != value
        out.append({"type": kind, "status": value, "observedGeneration": generation,
                    "lastTransitionTime": timestamp(now) if moved else cond.get("lastTransitionTime", timestamp(now)),
                    "reason": reason, "message": message})
    if not found:
        out.append({"type": kind, "status": value, "observedGeneration": generation,
                    "lastTransitionTime": timestamp(now), "reason": reason, "message": message})
    return out


def compute_phase(*, problem: str | None, desired: int, workload: WorkloadStatus,
                  previous: Mapping[str, Any]) -> PoolPhase:
    """Failed > Reconfiguring > Ready (all replicas ready) > Degraded (fewer, after having served) > Pending."""
    if problem is not None:
        return PoolPhase.FAILED
    if condition_status(previous.get("conditions") or [], RECONFIGURING) == "True":
        return PoolPhase.RECONFIGURING
    if desired > 0 and workload.ready_replicas >= desired:
        return PoolPhase.READY
    if previous.get("phase") in (PoolPhase.READY, PoolPhase.DEGRADED, PoolPhase.RECONFIGURING):
        return PoolPhase.DEGRADED
    return PoolPhase.PENDING


def ready_condition(*, problem: str | None, desired: int, workload: WorkloadStatus) -> tuple[bool, str, str]:
    """(status, reason, message) of Ready: True while at least one replica serves requests."""
    if problem is not None:
        return False, ReadyReason.INVALID_SPEC, f"invalid spec: {problem}"
    ready = workload.ready_replicas
    if ready <= 0:
        return False, ReadyReason.NO_REPLICA_READY, f"0/{desired} replicas ready"
    if ready < desired:
        return True, ReadyReason.PARTIALLY_READY, f"{ready}/{desired} replicas ready"
    return True, ReadyReason.ALL_REPLICAS_READY, f"{ready}/{desired} replicas ready"


def pool_status(*, name: str, generation: int, desired: int, problem: str | None, workload: WorkloadStatus,
                previous: Mapping[str, Any], now: datetime.datetime) -> dict[str, Any]:
    """The status fields this module owns (plus epoch/groups/groupCount when the pool has none yet).

    problem: why the spec is invalid (None when valid); desired: spec.replicas (0 when invalid)."""
    ready, reason, message = ready_condition(problem=problem, desired=desired, workload=workload)
    status: dict[str, Any] = {
        "phase": compute_phase(problem=problem, desired=desired, workload=workload, previous=previous).value,
        "observedGeneration": generation,
        "replicas": workload.replicas,
        "readyReplicas": workload.ready_replicas,
        "selector": selector_string(name),
        "conditions": set_condition(previous.get("conditions") or [], READY, ready, reason, message,
                                    generation, now),
    }
    if "epoch" not in previous:
        status["epoch"] = 0
    if "groups" not in previous:
        status.update(groups=[], groupCount=0)
    return status


def status_changes(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of wanted that differ from current (an empty dict: nothing to write)."""
    return {key: value for key, value in wanted.items() if current.get(key) != value}
