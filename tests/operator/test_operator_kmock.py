"""The real operator — kopf running the production handlers — against kmock's Kubernetes emulator over HTTP.

One operator serves the whole module (each test in its own namespace); the restart test runs its own.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import pytest

from kunserve.operator.manifests import pool_children
from kunserve.operator.validation import parse_pool
from tests.operator.emulator import EmulatorThread
from tests.operator.harness import TEST_CONFIG, OperatorHarness
from tests.operator.kubectl import Kubectl, wait_for
from tests.operator.pools import example, with_spec

POOLS = ("kunserve.io/v1alpha1", "servingpools")
STS = ("apps/v1", "statefulsets")
DEPLOY = ("apps/v1", "deployments")
SVC = ("v1", "services")
CHILDREN = [(SVC, "smollm2-agents"), (STS, "smollm2-agent"), (SVC, "smollm2-gateway"), (DEPLOY, "smollm2-gateway")]


def wait_for_children(k: Kubectl, ns: str) -> None:
    for (api, plural), name in CHILDREN:
        wait_for(functools.partial(k.get_or_none, api, plural, ns, name), what=f"{plural}/{name}")


@pytest.fixture(scope="module")
def harness() -> Iterator[OperatorHarness]:
    with OperatorHarness() as h:
        yield h
    # The operator stopped cleanly (KopfRunner re-raises otherwise) and no handler ever crashed.
    assert "Traceback" not in h.output, h.output[-5000:]


def submit(k: Kubectl, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    """kubectl apply of a new pool (what a client sends: no uid, generation or namespace in the body)."""
    body = {**body, "metadata": {"name": body["metadata"]["name"]}}
    created: dict[str, Any] = k.create(body, namespace=namespace)
    return created


def pool(k: Kubectl, ns: str, name: str = "smollm2") -> dict[str, Any]:
    found: dict[str, Any] = k.get(*POOLS, ns, name)
    return found


def pool_status_when(k: Kubectl, ns: str, check: Any, name: str = "smollm2", what: str = "pool status") -> Any:
    return wait_for(lambda: (s := (k.get_or_none(*POOLS, ns, name) or {}).get("status")) and check(s) and s,
                    what=what)


def ready_condition(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status.get("conditions", []) if c["type"] == "Ready")


def events(k: Kubectl, ns: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in k.list("v1", "events", ns) if e.get("reason") == reason]


def test_applying_a_pool_creates_its_workloads_and_status(harness: OperatorHarness) -> None:
    k, ns = harness.kubectl, harness.new_namespace()
    created = submit(k, ns, example())
    wait_for_children(k, ns)
    expected = pool_children(parse_pool(created), TEST_CONFIG)
    for manifest, ((api, plural), name) in zip(expected, CHILDREN, strict=True):
        live = k.get(api, plural, ns, name)
        assert live["spec"] == manifest["spec"]
        assert live["metadata"]["labels"] == manifest["metadata"]["labels"]
        assert live["metadata"]["ownerReferences"] == [{
            "apiVersion": "kunserve.io/v1alpha1", "kind": "ServingPool", "name": "smollm2",
            "uid": created["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]

    status = pool_status_when(k, ns, lambda s: s.get("phase") == "Pending")
    assert {key: status[key] for key in ("epoch", "groups", "groupCount", "replicas", "readyReplicas", "selector",
                                         "observedGeneration")} == {
        "epoch": 0, "groups": [], "groupCount": 0, "replicas": 0, "readyReplicas": 0, "observedGeneration": 1,
        "selector": "app.kubernetes.io/component=agent,kunserve.io/pool=smollm2"}
    assert ready_condition(status) | {"lastTransitionTime": ""} == {
        "type": "Ready", "status": "False", "observedGeneration": 1, "lastTransitionTime": "",
        "reason": "NoReplicaReady", "message": "0/2 replicas ready"}

    # The agents' pods become ready (the emulator has no kubelet: write the StatefulSet's status).
    k.patch(*STS, ns, "smollm2-agent", {"status": {"replicas": 2, "readyReplicas": 2}}, subresource="status")
    status = pool_status_when(k, ns, lambda s: s.get("phase") == "Ready", what="phase Ready")
    assert (status["readyReplicas"], status["replicas"]) == (2, 2)
    assert (ready_condition(status)["status"], ready_condition(status)["reason"]) == ("True", "AllReplicasReady")

    k.patch(*STS, ns, "smollm2-agent", {"status": {"readyReplicas": 1}}, subresource="status")
    status = pool_status_when(k, ns, lambda s: s.get("phase") == "Degraded", what="phase Degraded")
    assert ready_condition(status)["message"] == "1/2 replicas ready"


INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "replicas-0": ({"replicas": 0}, "spec.replicas: must be between 1 and 1024, got 0"),
    "missing-model-path": ({"model": {"path": None}}, "spec.model.path: is required"),
    "max-group-size-above-replicas": ({"elasticity": {"maxGroupSize": 4}},
                                      "spec.elasticity.maxGroupSize: (4) must be <= replicas (2)"),
    "restore-not-below-drop": ({"elasticity": {"restoreDemand": 0.95}},
                               "spec.elasticity.restoreDemand: (0.95) must be lower than elasticity.dropDemand"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_an_invalid_pool_is_not_ready_with_a_clear_message_and_an_event(harness: OperatorHarness, case: str) -> None:
    k, ns = harness.kubectl, harness.new_namespace("bad")
    changes, message = INVALID[case]
    submit(k, ns, with_spec(example(), **changes))
    status = pool_status_when(k, ns, lambda s: s.get("phase") == "Failed", what="phase Failed")
    ready = ready_condition(status)
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert ready["message"].startswith(f"invalid spec: {message}"), ready["message"]
    event = wait_for(lambda: events(k, ns, "InvalidSpec"), what="InvalidSpec event")[0]
    assert event["type"] == "Warning" and event["message"].startswith(message)
    assert event["involvedObject"]["name"] == "smollm2" and event["involvedObject"]["kind"] == "ServingPool"
    assert k.get_or_none(*STS, ns, "smollm2-agent") is None  # nothing is created for an invalid pool


def test_updating_replicas_updates_the_statefulset(harness: OperatorHarness) -> None:
    k, ns = harness.kubectl, harness.new_namespace("scale")
    submit(k, ns, example())
    wait_for(lambda: k.get_or_none(*STS, ns, "smollm2-agent"), what="StatefulSet")
    k.patch(*POOLS, ns, "smollm2", {"spec": {"replicas": 3, "elasticity": {"maxGroupSize": 3},
                                             "gateway": {"replicas": 2}}})
    wait_for(lambda: k.get(*STS, ns, "smollm2-agent")["spec"]["replicas"] == 3, what="3 replicas")
    wait_for(lambda: k.get(*DEPLOY, ns, "smollm2-gateway")["spec"]["replicas"] == 2, what="2 gateways")
    status = pool_status_when(k, ns, lambda s: s.get("observedGeneration") == 2, what="generation 2")
    assert ready_condition(status)["message"] == "0/3 replicas ready"

    # An edit that makes the spec invalid leaves the running workloads alone and says why.
    k.patch(*POOLS, ns, "smollm2", {"spec": {"replicas": 0}})
    status = pool_status_when(k, ns, lambda s: s.get("phase") == "Failed", what="phase Failed")
    assert ready_condition(status)["message"].startswith("invalid spec: spec.replicas")
    assert k.get(*STS, ns, "smollm2-agent")["spec"]["replicas"] == 3


def test_deleting_the_pool_removes_what_it_created(harness: OperatorHarness) -> None:
    k, ns = harness.kubectl, harness.new_namespace("del")
    submit(k, ns, example())
    wait_for_children(k, ns)
    assert pool(k, ns)["metadata"]["finalizers"] == ["kunserve.io/operator"]
    k.delete(*POOLS, ns, "smollm2")
    wait_for(lambda: k.get_or_none(*POOLS, ns, "smollm2") is None, what="pool gone")
    for (api, plural), _name in CHILDREN:
        assert k.list(api, plural, ns) == [], plural


def test_a_restarted_operator_resumes_and_repairs_drift() -> None:
    with EmulatorThread() as emulator:
        with OperatorHarness(emulator=emulator) as first:
            k, ns = first.kubectl, first.new_namespace("resume")
            submit(k, ns, example())
            wait_for(lambda: k.get_or_none(*DEPLOY, ns, "smollm2-gateway"), what="gateway")
            first.settle(ns, "smollm2")
        k.delete(*DEPLOY, ns, "smollm2-gateway")  # while no operator runs
        fast_resync = dataclasses.replace(TEST_CONFIG, resync_interval_s=0.3)
        with OperatorHarness(config=fast_resync, emulator=emulator) as second:
            wait_for(lambda: k.get_or_none(*DEPLOY, ns, "smollm2-gateway"), what="gateway back on resume")
            k.delete(*SVC, ns, "smollm2-agents")  # while it runs: the periodic resync puts it back
            wait_for(lambda: k.get_or_none(*SVC, ns, "smollm2-agents"), what="headless Service back on resync")
        assert "Traceback" not in first.output + second.output
