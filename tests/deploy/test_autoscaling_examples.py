"""The autoscaling examples (KEDA ScaledObject, HPA) parse, validate where a schema is at hand, scale a ServingPool
through its scale subresource, and ask for series the operator exports."""

from __future__ import annotations

import re

import pytest

from kunserve.operator.autoscale_status import PoolMetrics
from tests.deploy.crd_tools import EXAMPLES_DIR, load_crd, load_one

POOL = load_one(EXAMPLES_DIR / "servingpool-autoscaling.yaml")


def exported() -> set[str]:
    return {m.name for m in PoolMetrics().registry.collect()} | {"kunserve_pool_scale_events_total"}


def test_the_target_has_a_scale_subresource() -> None:
    (version,) = load_crd("servingpools")["spec"]["versions"]
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                                "statusReplicasPath": ".status.replicas",
                                                "labelSelectorPath": ".status.selector"}


@pytest.mark.parametrize("name", ["keda-scaledobject.yaml", "hpa-servingpool.yaml"])
def test_example_scales_the_example_pool_within_its_bounds(name: str) -> None:
    doc = load_one(EXAMPLES_DIR / name)
    ref = doc["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("kunserve.io/v1alpha1", "ServingPool",
                                                             POOL["metadata"]["name"])
    bounds = POOL["spec"]["autoscaling"]
    lo = doc["spec"].get("minReplicaCount", doc["spec"].get("minReplicas"))
    hi = doc["spec"].get("maxReplicaCount", doc["spec"].get("maxReplicas"))
    assert (lo, hi) == (bounds["minReplicas"], bounds["maxReplicas"])
    text = (EXAMPLES_DIR / name).read_text(encoding="utf-8")
    assert "driver: External" in text and f"kubectl apply -f deploy/examples/{name}" in text


def test_keda_trigger_queries_an_exported_full_capacity_series() -> None:
    spec = load_one(EXAMPLES_DIR / "keda-scaledobject.yaml")["spec"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    names = set(re.findall(r"kunserve_[a-z_]+", trigger["metadata"]["query"]))
    assert names and names <= exported()
    assert float(trigger["metadata"]["threshold"]) > 0


def test_hpa_validates_and_uses_an_exported_series() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    doc = load_one(EXAMPLES_DIR / "hpa-servingpool.yaml")
    for version in ("1.30", "1.37"):
        kubernetes_validate.validate(doc, version, strict=True)
    (metric,) = doc["spec"]["metrics"]
    assert metric["external"]["metric"]["name"] in exported()
