"""The pool's status (pure) and the reconcile functions over a fake KubeApi: conflicts, ownership."""

from __future__ import annotations

import asyncio
import copy
import datetime
import logging
from collections.abc import Mapping
from typing import Any

from kunserve.operator.kube import SERVINGPOOLS, STATEFULSETS, Conflict, ResourceKind, kind_of
from kunserve.operator.pool_status import (
    PoolPhase,
    WorkloadStatus,
    compute_phase,
    pool_status,
    set_condition,
    status_changes,
)
from kunserve.operator.reconcile import delete_pool_children, reconcile_pool, refresh_pool_status
from tests.operator.harness import TEST_CONFIG
from tests.operator.pools import example, with_spec

T0 = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=1)
LOG = logging.getLogger("test")
SELECTOR = "app.kubernetes.io/component=agent,kunserve.io/pool=smollm2"


def status(previous: Mapping[str, Any], *, ready: int = 0, replicas: int = 0, desired: int = 2,
           problem: str | None = None, now: datetime.datetime = T0, generation: int = 1) -> dict[str, Any]:
    return pool_status(name="smollm2", generation=generation, desired=desired, problem=problem,
                       workload=WorkloadStatus(replicas, ready), previous=previous, now=now)


def test_first_status_of_a_valid_pool() -> None:
    assert status({}) == {
        "phase": "Pending", "observedGeneration": 1, "replicas": 0, "readyReplicas": 0, "selector": SELECTOR,
        "conditions": [{"type": "Ready", "status": "False", "observedGeneration": 1,
                        "lastTransitionTime": "2026-01-02T03:04:05Z", "reason": "NoReplicaReady",
                        "message": "0/2 replicas ready"}],
        "epoch": 0, "groups": [], "groupCount": 0,
    }


def test_phases_follow_readiness() -> None:
    pending = status({})
    partly = status(pending, ready=1, replicas=2, now=T1)
    assert (partly["phase"], partly["conditions"][0]["status"], partly["conditions"][0]["reason"]) == (
        "Pending", "True", "PartiallyReady")  # Pending until every replica is ready the first time
    ready = status({**pending, **partly}, ready=2, replicas=2, now=T1)
    assert ready["phase"] == "Ready" and ready["conditions"][0]["message"] == "2/2 replicas ready"
    degraded = status({**pending, **ready}, ready=1, replicas=2, now=T1)
    assert degraded["phase"] == "Degraded"
    assert "epoch" not in degraded and "groups" not in degraded  # owned by the executor once set


def test_invalid_spec_fails_with_the_reason() -> None:
    failed = status({}, problem="spec.replicas: must be between 1 and 1024, got 0", desired=0)
    assert failed["phase"] == "Failed"
    assert failed["conditions"] == [{
        "type": "Ready", "status": "False", "observedGeneration": 1, "lastTransitionTime": "2026-01-02T03:04:05Z",
        "reason": "InvalidSpec", "message": "invalid spec: spec.replicas: must be between 1 and 1024, got 0"}]


def test_reconfiguring_condition_wins_and_is_carried_over() -> None:
    reconfiguring = {"type": "Reconfiguring", "status": "True", "lastTransitionTime": "x", "reason": "Drop",
                     "message": "epoch 3"}
    previous = {"phase": "Ready", "epoch": 2, "groups": [{"id": "g1"}], "conditions": [reconfiguring]}
    out = status(previous, ready=2, replicas=2)
    assert out["phase"] == "Reconfiguring"
    assert out["conditions"][0] == reconfiguring and out["conditions"][1]["type"] == "Ready"
    assert compute_phase(problem="bad", desired=0, workload=WorkloadStatus(), previous=previous) is PoolPhase.FAILED


def test_transition_time_moves_only_with_the_status() -> None:
    first = set_condition([], "Ready", False, "NoReplicaReady", "0/2", 1, T0)
    same = set_condition(first, "Ready", False, "NoReplicaReady", "still 0/2", 2, T1)
    flipped = set_condition(same, "Ready", True, "AllReplicasReady", "2/2", 2, T1)
    assert same[0]["lastTransitionTime"] == "2026-01-02T03:04:05Z" and same[0]["message"] == "still 0/2"
    assert flipped[0]["lastTransitionTime"] == "2026-01-02T03:05:05Z"


def test_status_changes() -> None:
    current = status({})
    assert status_changes(current, status(current)) == {}
    assert status_changes(current, status(current, generation=2)).keys() == {"observedGeneration", "conditions"}


class FakeKube:
    """An in-memory KubeApi: apply stores, patches merge, one injected 409 on the first status write."""

    def __init__(self, conflicts: int = 0) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.conflicts = conflicts
        self.version = 0

    def put(self, kind: ResourceKind, body: dict[str, Any]) -> None:
        self.version += 1
        body["metadata"]["resourceVersion"] = str(self.version)
        self.objects[(kind.plural, body["metadata"]["namespace"], body["metadata"]["name"])] = body

    async def get(self, kind: ResourceKind, namespace: str, name: str) -> dict[str, Any] | None:
        body = self.objects.get((kind.plural, namespace, name))
        return copy.deepcopy(body) if body is not None else None

    async def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        self.put(kind_of(manifest), copy.deepcopy(dict(manifest)))
        return dict(manifest)

    async def patch(self, kind: ResourceKind, namespace: str, name: str, patch: Mapping[str, Any],
                    subresource: str | None = None) -> dict[str, Any]:
        body = self.objects[(kind.plural, namespace, name)]
        if self.conflicts:
            self.conflicts -= 1
            body["metadata"]["resourceVersion"] = "moved-on"
            raise Conflict(409, "conflict")
        assert patch["metadata"]["resourceVersion"] == body["metadata"]["resourceVersion"]
        body.setdefault("status", {}).update(patch["status"])
        return body

    async def delete(self, kind: ResourceKind, namespace: str, name: str) -> bool:
        return self.objects.pop((kind.plural, namespace, name), None) is not None


def test_reconcile_applies_children_and_retries_a_conflicting_status_write() -> None:
    kube = FakeKube(conflicts=1)
    body = example()
    kube.put(SERVINGPOOLS, body)
    result = asyncio.run(reconcile_pool(kube, TEST_CONFIG, body, LOG, clock=lambda: T0))
    assert result.invalid is None
    assert result.applied == ("Service/smollm2-agents", "StatefulSet/smollm2-agent", "Service/smollm2-gateway",
                              "Deployment/smollm2-gateway")
    assert kube.objects[("servingpools", "ns", "smollm2")]["status"]["phase"] == "Pending"
    assert asyncio.run(refresh_pool_status(kube, "ns", "smollm2", LOG, clock=lambda: T1)) == {}  # nothing new


def test_reconcile_of_an_invalid_spec_changes_no_workload() -> None:
    kube = FakeKube()
    kube.put(SERVINGPOOLS, with_spec(example(), replicas=0))
    result = asyncio.run(reconcile_pool(kube, TEST_CONFIG, kube.objects[("servingpools", "ns", "smollm2")], LOG))
    assert result.pool is None and result.applied == ()
    assert str(result.invalid) == "spec.replicas: must be between 1 and 1024, got 0"
    assert [key[0] for key in kube.objects] == ["servingpools"]
    assert kube.objects[("servingpools", "ns", "smollm2")]["status"]["phase"] == "Failed"


def test_delete_leaves_objects_the_pool_does_not_own() -> None:
    kube = FakeKube()
    body = example()
    kube.put(SERVINGPOOLS, body)
    asyncio.run(reconcile_pool(kube, TEST_CONFIG, body, LOG))
    stranger = copy.deepcopy(kube.objects[("statefulsets", "ns", "smollm2-agent")])
    stranger["metadata"]["ownerReferences"] = [{"uid": "someone-else"}]
    kube.put(STATEFULSETS, stranger)
    deleted = asyncio.run(delete_pool_children(kube, "ns", "smollm2", "uid-1", LOG))
    assert deleted == ["deployments/smollm2-gateway", "services/smollm2-gateway", "services/smollm2-agents"]
    assert ("statefulsets", "ns", "smollm2-agent") in kube.objects
