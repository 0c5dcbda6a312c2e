"""parse_pool: CRD defaults, and a typed error with a clear message for every rule the API server would
enforce (kmock enforces none) — each case is checked against the CRD itself too, so the two cannot drift."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from kunserve.operator.plan_types import PoolSpec
from kunserve.operator.pool_spec import Dtype, Elasticity, InvalidServingPool, SpecProblem
from kunserve.operator.quantity import cpu_threads, parse_quantity
from kunserve.operator.validation import parse_pool
from tests.deploy.crd_tools import apply_defaults, cel_errors, load_crd, root_schema, validation_errors
from tests.operator.pools import GPU, example, with_spec

POOL_ROOT = root_schema(load_crd("servingpools"))
MINIMAL = {"apiVersion": "kunserve.io/v1alpha1", "kind": "ServingPool",
           "metadata": {"name": "tiny", "namespace": "ns", "uid": "u", "generation": 3},
           "spec": {"model": {"name": "tiny", "path": "/models/tiny"}, "replicas": 4}}


def crd_rejects(body: dict[str, Any]) -> bool:
    """Whether the API server would refuse body (schema after defaulting, then CEL)."""
    plain = {k: v for k, v in body.items() if k != "metadata"} | {"metadata": {"name": body["metadata"]["name"]}}
    defaulted = apply_defaults(POOL_ROOT, plain)
    return bool(validation_errors(load_crd("servingpools"), defaulted) or cel_errors(POOL_ROOT, plain))


def problems(body: dict[str, Any]) -> list[SpecProblem]:
    with pytest.raises(InvalidServingPool) as info:
        parse_pool(body)
    return list(info.value.problems)


def test_examples_parse() -> None:
    pytest.importorskip("celpy")
    assert not crd_rejects(example()) and not crd_rejects(example(GPU))
    assert parse_pool(example()).spec.replicas == 2
    gpu = parse_pool(example(GPU))
    assert (gpu.spec.model.dtype, gpu.spec.uses_gpus, gpu.spec.elasticity.max_group_size) == (Dtype.BFLOAT16, True, 4)


def test_defaults_match_the_crd() -> None:
    """What the operator assumes for an omitted field is what the API server would have stored."""
    pytest.importorskip("jsonschema")
    server_defaulted = apply_defaults(POOL_ROOT, MINIMAL)
    assert server_defaulted != MINIMAL  # the CRD does default something here
    assert parse_pool(MINIMAL) == parse_pool(server_defaulted)
    pool = parse_pool(MINIMAL)
    assert (pool.ref.name, pool.ref.namespace, pool.ref.uid, pool.ref.generation) == ("tiny", "ns", "u", 3)
    assert pool.spec.elasticity == Elasticity(True, 0.9, 0.5, 30, 4)
    assert (pool.spec.engine.block_size, pool.spec.termination_grace_period_s, pool.spec.gateway.replicas) == (
        16, 120, 1)
    assert not pool.spec.uses_gpus


# (case id, spec changes or a whole-body function, expected (path, message start), API server rejects it too)
CASES: list[tuple[str, Any, tuple[str, str], bool]] = [
    ("replicas-0", {"replicas": 0}, ("spec.replicas", "must be between 1 and 1024, got 0"), True),
    ("replicas-missing", {"replicas": None}, ("spec.replicas", "is required"), True),
    ("replicas-not-int", {"replicas": "2"}, ("spec.replicas", "must be an integer, got '2'"), True),
    ("model-path-missing", {"model": {"path": None}}, ("spec.model.path", "is required: the checkpoint directory"),
     True),
    ("model-path-empty", {"model": {"path": ""}}, ("spec.model.path", "is required"), True),
    ("model-missing", {"model": None}, ("spec.model", "is required"), True),
    ("model-path-outside-mount", {"model": {"path": "/data/smollm2"}},
     ("spec.model.path", "'/data/smollm2' must lie inside model.source.mountPath ('/models')"), True),
    ("source-both", {"model": {"source": {"pvc": {"claimName": "m"}}}},
     ("spec.model.source", "needs exactly one of pvc or hostPath"), True),
    ("max-group-size-above-replicas", {"elasticity": {"maxGroupSize": 3}},
     ("spec.elasticity.maxGroupSize", "(3) must be <= replicas (2): a group cannot have more members"), True),
    ("default-max-group-size-above-replicas", {"elasticity": {"maxGroupSize": None}},
     ("spec.elasticity.maxGroupSize", "(4) must be <= replicas (2)"), True),
    ("restore-equals-drop", {"elasticity": {"restoreDemand": 0.9}},
     ("spec.elasticity.restoreDemand", "(0.9) must be lower than elasticity.dropDemand (0.9)"), True),
    ("restore-above-drop", {"elasticity": {"dropDemand": 0.4}},
     ("spec.elasticity.restoreDemand", "(0.5) must be lower than elasticity.dropDemand (0.4)"), True),
    ("block-size", {"engine": {"blockSize": 12}}, ("spec.engine.blockSize", "must be one of [8, 16, 32]"), True),
    ("budget-too-small", {"engine": {"memoryBudgetBytes": 1024}},
     ("spec.engine.memoryBudgetBytes", "must be between 1048576"), True),
    ("bad-quantity", {"resources": {"limits": {"memory": "lots"}}},
     ("spec.resources.limits.memory", "'lots' is not a Kubernetes quantity"), True),
    ("bad-dtype", {"model": {"dtype": "int4"}}, ("spec.model.dtype", "must be one of ['float32'"), True),
    ("bad-secret-ref", {"gateway": {"apiKeySecretRef": {"name": "Keys!"}}},
     ("spec.gateway.apiKeySecretRef.name", "'Keys!' does not match"), True),
    # Only the operator can tell this (the CRD allows it):
    ("restore-demand-zero", {"elasticity": {"restoreDemand": 0}},
     ("spec.elasticity.restoreDemand", "must be greater than 0 while elasticity is enabled"), False),
]


@pytest.mark.parametrize(("changes", "expected", "server_rejects"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_spec_is_a_typed_error_naming_the_field(changes: dict[str, Any], expected: tuple[str, str],
                                                        server_rejects: bool) -> None:
    body = with_spec(example(), **changes)
    found = problems(body)
    path, message = expected
    assert any(p.path == path and p.message.startswith(message) for p in found), found
    assert str(InvalidServingPool(found)).count(path) >= 1
    if server_rejects:
        pytest.importorskip("celpy")
        assert crd_rejects(body), "the CRD accepts a spec the operator rejects"


def test_bad_names() -> None:
    too_long = example(name="a" * 41)
    assert problems(too_long)[0].path == "metadata.name"
    assert "at most 40 characters" in problems(example(name="9lives"))[0].message


def test_elasticity_disabled_allows_a_single_replica() -> None:
    pool = parse_pool(with_spec(example(), replicas=1, elasticity={"enabled": False, "maxGroupSize": None}))
    assert pool.spec.replicas == 1 and pool.spec.elasticity.max_group_size == 4


def test_every_problem_is_reported_at_once() -> None:
    body = with_spec(example(), replicas=0, model={"path": None}, elasticity={"restoreDemand": 0.95})
    assert [p.path for p in problems(body)] == ["spec.model.path", "spec.replicas", "spec.elasticity.restoreDemand"]


def test_body_without_spec() -> None:
    assert problems({"metadata": {"name": "p"}}) == [SpecProblem("spec", "is required")]


def test_elasticity_to_planner() -> None:
    assert parse_pool(example()).spec.elasticity.to_planner() == PoolSpec(
        drop_demand=0.9, restore_demand=0.5, restore_window_s=30.0, max_group_size=2)


@pytest.mark.parametrize(("text", "value"), [
    ("2", Decimal(2)), (3, Decimal(3)), ("500m", Decimal("0.5")), ("1.5", Decimal("1.5")), ("64Gi", Decimal(2**36)),
    ("1k", Decimal(1000)), ("1e3", Decimal(1000)), (".5", Decimal("0.5")),
])
def test_parse_quantity(text: str | int, value: Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["lots", "1.2.3", "", "2 Gi", True])
def test_parse_quantity_rejects(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_quantity(text)


def test_cpu_threads() -> None:
    assert [cpu_threads(v) for v in ("250m", "1", "1500m", 8)] == [1, 1, 1, 8]
