"""A ServingPool as typed values (what `validation.parse_pool` returns) and its typed validation error.

A real API server defaults and validates a ServingPool before the operator sees it; an API server without
the CRD's schema (kmock in tests, an older CRD version) does not, and a Reconfiguration planned from a bad
spec could hurt a serving pool. So `parse_pool` re-checks everything the operator relies on and raises
`InvalidServingPool` (every problem, each naming its field) instead of guessing. The defaults below mirror
deploy/helm/kunserve/crds/servingpools.kunserve.io.yaml (tests/operator/test_validation.py keeps them equal).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kunserve.operator.autoscale import AutoscalePolicy, Driver
from kunserve.operator.plan_types import PoolSpec

GROUP = "kunserve.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ServingPool"
PLURAL = "servingpools"
GPU_RESOURCE = "nvidia.com/gpu"


class Dtype(StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class PullPolicy(StrEnum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


@dataclass(slots=True, frozen=True)
class SpecProblem:
    """One violated rule: `path` is the field as kubectl names it (spec.elasticity.maxGroupSize)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class InvalidServingPool(ValueError):
    """The ServingPool cannot be served as written; `problems` says why, field by field."""

    def __init__(self, problems: list[SpecProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in problems))


@dataclass(slots=True, frozen=True)
class PoolRef:
    """Identity of the ServingPool object (what owner references and events point at)."""

    name: str
    namespace: str
    uid: str = ""
    generation: int = 0


@dataclass(slots=True, frozen=True)
class ModelSource:
    mount_path: str = "/models"
    pvc_claim: str | None = None
    pvc_sub_path: str | None = None
    host_path: str | None = None


@dataclass(slots=True, frozen=True)
class ModelSpec:
    name: str
    path: str
    dtype: Dtype = Dtype.FLOAT32
    source: ModelSource | None = None


@dataclass(slots=True, frozen=True)
class Elasticity:
    enabled: bool = True
    drop_demand: float = 0.9
    restore_demand: float = 0.5
    restore_window_s: int = 30
    max_group_size: int = 4

    def to_planner(self) -> PoolSpec:
        """The planner's view of these thresholds (for the pressure daemon)."""
        return PoolSpec(drop_demand=self.drop_demand, restore_demand=self.restore_demand,
                        restore_window_s=float(self.restore_window_s), max_group_size=self.max_group_size)


@dataclass(slots=True, frozen=True)
class Autoscaling:
    """spec.autoscaling: the operator owns the agents' replica count between min and max (see autoscale.py)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_demand: float = 0.7
    scale_up_stabilization_s: int = 0
    scale_down_stabilization_s: int = 300
    drain_timeout_s: int = 300
    driver: Driver = Driver.OPERATOR

    def to_policy(self) -> AutoscalePolicy:
        return AutoscalePolicy(min_replicas=self.min_replicas, max_replicas=self.max_replicas,
                               target_demand=self.target_demand,
                               scale_up_window_s=float(self.scale_up_stabilization_s),
                               scale_down_window_s=float(self.scale_down_stabilization_s),
                               drain_timeout_s=float(self.drain_timeout_s), driver=self.driver)


@dataclass(slots=True, frozen=True)
class Slo:
    ttft_s: float | None = None
    tpot_s: float | None = None


@dataclass(slots=True, frozen=True)
class EngineSpec:
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    memory_budget_bytes: int | None = None


@dataclass(slots=True, frozen=True)
class SecretKeyRef:
    name: str
    key: str


@dataclass(slots=True, frozen=True)
class GatewaySpec:
    replicas: int = 1
    api_key_secret: SecretKeyRef | None = None


@dataclass(slots=True, frozen=True)
class ServingPoolSpec:
    model: ModelSpec
    replicas: int
    devices_per_replica: int = 1
    image: str | None = None
    image_pull_policy: PullPolicy | None = None
    elasticity: Elasticity = field(default_factory=Elasticity)
    slo: Slo = field(default_factory=Slo)
    engine: EngineSpec = field(default_factory=EngineSpec)
    requests: Mapping[str, str | int] = field(default_factory=dict)
    limits: Mapping[str, str | int] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] | None = None
    termination_grace_period_s: int = 120
    gateway: GatewaySpec = field(default_factory=GatewaySpec)
    autoscaling: Autoscaling | None = None  # None: the replica count is spec.replicas, nothing more

    @property
    def uses_gpus(self) -> bool:
        """GPU pools name nvidia.com/gpu in resources or ask for more than one device per replica.
        (devicesPerReplica is 1 on CPU pools too, so 1 alone does not make a GPU pool.)"""
        return GPU_RESOURCE in self.requests or GPU_RESOURCE in self.limits or self.devices_per_replica > 1


@dataclass(slots=True, frozen=True)
class ServingPool:
    ref: PoolRef
    spec: ServingPoolSpec


def workload_replicas(pool: ServingPool, status: Mapping[str, Any] | None) -> int:
    """The agents' replica count: spec.replicas, or with autoscaling the count the operator recorded in
    status.autoscaling.replicas (spec.replicas, clamped to [min, max], before the first record)."""
    scaling = pool.spec.autoscaling
    if scaling is None:
        return pool.spec.replicas
    recorded = ((status or {}).get("autoscaling") or {}).get("replicas")
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 1:
        return recorded
    return min(max(pool.spec.replicas, scaling.min_replicas), scaling.max_replicas)


def draining_replicas(status: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Replicas the autoscaler drains (no new requests routed to them), from status.autoscaling.draining."""
    raw = ((status or {}).get("autoscaling") or {}).get("draining") or []
    return tuple(str(d) for d in raw if isinstance(d, str))
