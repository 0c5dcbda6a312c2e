"""`parse_pool`: a ServingPool object (JSON) → `ServingPool`, or `InvalidServingPool` naming every problem.

Re-checks the CRD's bounds, enums and required fields and its CEL rules (x-kubernetes-validations), which
the API server normally enforces, plus what only the operator can tell (thresholds the planner cannot
use). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kunserve.operator.autoscale import Driver
from kunserve.operator.pool_spec import (
    Autoscaling,
    Dtype,
    Elasticity,
    EngineSpec,
    GatewaySpec,
    InvalidServingPool,
    ModelSource,
    ModelSpec,
    PoolRef,
    PullPolicy,
    SecretKeyRef,
    ServingPool,
    ServingPoolSpec,
    Slo,
    SpecProblem,
)
from kunserve.operator.quantity import parse_quantity
from kunserve.operator.spec_reader import ABS_PATH, DNS_SUBDOMAIN, MODEL_NAME, POOL_NAME, SECRET_KEY, SpecReader

MAX_POOL_NAME_LENGTH = 40  # the pool's name prefixes its StatefulSet, Services and pods


def parse_pool(body: Mapping[str, Any]) -> ServingPool:
    """The typed pool, CRD defaults applied; raises InvalidServingPool listing every violated rule."""
    problems: list[SpecProblem] = []
    r = SpecReader(problems)
    meta = body.get("metadata") or {}
    name = str(meta.get("name") or "")
    if not POOL_NAME.match(name) or len(name) > MAX_POOL_NAME_LENGTH:
        r.bad("metadata.name", f"{name!r} must be a DNS-1035 label of at most {MAX_POOL_NAME_LENGTH} characters "
                               "(lower-case letters, digits and '-', starting with a letter)")
    generation = meta.get("generation")
    ref = PoolRef(name=name, namespace=str(meta.get("namespace") or ""), uid=str(meta.get("uid") or ""),
                  generation=generation if isinstance(generation, int) else 0)
    spec = body.get("spec")
    if not isinstance(spec, Mapping):
        r.bad("spec", "is required")
        raise InvalidServingPool(problems)

    model = _model(r, spec)
    replicas = r.int_(spec, "replicas", "spec", None, 1, 1024)
    if replicas is None:
        r.bad("spec.replicas", "is required")
    devices = r.int_(spec, "devicesPerReplica", "spec", 1, 1, 16) or 1
    elasticity = _elasticity(r, spec, replicas if replicas is not None and replicas >= 1 else None)
    engine = _engine(r, r.obj(spec, "engine", "spec"))
    requests, limits = _resources(r, r.obj(spec, "resources", "spec"))
    slo_raw = r.obj(spec, "slo", "spec")
    slo = Slo(ttft_s=r.num(slo_raw, "ttftSeconds", "spec.slo", None, 0, 3600, exclusive_lo=True),
              tpot_s=r.num(slo_raw, "tpotSeconds", "spec.slo", None, 0, 60, exclusive_lo=True))
    gateway = _gateway(r, r.obj(spec, "gateway", "spec"))
    autoscaling = _autoscaling(r, spec, elasticity)
    node_selector = {str(k): str(v) for k, v in r.obj(spec, "nodeSelector", "spec").items()}
    tolerations = spec.get("tolerations") or []
    if not isinstance(tolerations, list) or not all(isinstance(t, Mapping) for t in tolerations):
        r.bad("spec.tolerations", "must be a list of objects")
        tolerations = []
    affinity = r.obj(spec, "affinity", "spec") or None
    grace = r.int_(spec, "terminationGracePeriodSeconds", "spec", 120, 0, 3600)
    image = r.str_(spec, "image", "spec", max_len=1024)
    pull = r.enum(spec, "imagePullPolicy", "spec", PullPolicy, None)

    if problems or model is None or replicas is None:
        raise InvalidServingPool(problems)
    return ServingPool(ref=ref, spec=ServingPoolSpec(
        model=model, replicas=replicas, devices_per_replica=devices, image=image, image_pull_policy=pull,
        elasticity=elasticity, slo=slo, engine=engine, requests=requests, limits=limits,
        node_selector=node_selector, tolerations=tuple(dict(t) for t in tolerations),
        affinity=dict(affinity) if affinity else None, termination_grace_period_s=grace if grace is not None else 120,
        gateway=gateway, autoscaling=autoscaling))


def _model(r: SpecReader, spec: Mapping[str, Any]) -> ModelSpec | None:
    if not isinstance(spec.get("model"), Mapping):
        r.bad("spec.model", "is required (name and path of the checkpoint every replica serves)")
        return None
    raw = r.obj(spec, "model", "spec")
    name = r.str_(raw, "name", "spec.model", pattern=MODEL_NAME, max_len=256, required=True)
    path = r.str_(raw, "path", "spec.model")
    if path is None and not raw.get("path"):
        r.bad("spec.model.path", "is required: the checkpoint directory (config.json, *.safetensors, "
                                 "tokenizer.json) as seen inside the agent pods")
    dtype = r.enum(raw, "dtype", "spec.model", Dtype, Dtype.FLOAT32)
    source = None
    if "source" in raw:
        src = r.obj(raw, "source", "spec.model")
        mount = r.str_(src, "mountPath", "spec.model.source", "/models", pattern=ABS_PATH, max_len=1024) or "/models"
        pvc, host = r.obj(src, "pvc", "spec.model.source"), r.obj(src, "hostPath", "spec.model.source")
        if bool(pvc) == bool(host):
            r.bad("spec.model.source", "needs exactly one of pvc or hostPath")
        claim = r.str_(pvc, "claimName", "spec.model.source.pvc", pattern=DNS_SUBDOMAIN, max_len=253,
                       required=bool(pvc))
        sub_path = r.str_(pvc, "subPath", "spec.model.source.pvc", max_len=1024)
        if sub_path is not None and sub_path.startswith("/"):
            r.bad("spec.model.source.pvc.subPath", "must be relative (no leading '/')")
        host_path = r.str_(host, "path", "spec.model.source.hostPath", required=bool(host))
        if host_path is not None and not host_path.startswith("/"):
            r.bad("spec.model.source.hostPath.path", "must be an absolute directory")
        source = ModelSource(mount_path=mount, pvc_claim=claim, pvc_sub_path=sub_path, host_path=host_path)
        if path is not None and path != mount and not path.startswith(mount + "/"):
            r.bad("spec.model.path", f"{path!r} must lie inside model.source.mountPath ({mount!r}), "
                                     "where the model volume is mounted")
    if name is None or path is None:
        return None
    return ModelSpec(name=name, path=path, dtype=dtype, source=source)


def _elasticity(r: SpecReader, spec: Mapping[str, Any], replicas: int | None) -> Elasticity:
    raw, path = r.obj(spec, "elasticity", "spec"), "spec.elasticity"
    d = Elasticity()
    e = Elasticity(
        enabled=r.bool_(raw, "enabled", path, d.enabled),
        drop_demand=r.num(raw, "dropDemand", path, d.drop_demand, 0, 4) or 0.0,
        restore_demand=r.num(raw, "restoreDemand", path, d.restore_demand, 0, 1) or 0.0,
        restore_window_s=r.int_(raw, "restoreWindowSeconds", path, d.restore_window_s, 0, 86400) or 0,
        max_group_size=r.int_(raw, "maxGroupSize", path, d.max_group_size, 2, 64) or d.max_group_size,
    )
    if e.restore_demand >= e.drop_demand:
        r.bad(f"{path}.restoreDemand", f"({e.restore_demand}) must be lower than elasticity.dropDemand "
                                       f"({e.drop_demand}): a group restores only once demand has fallen well "
                                       "below the level that made it drop")
    elif e.enabled and e.restore_demand <= 0:
        r.bad(f"{path}.restoreDemand", "must be greater than 0 while elasticity is enabled (the planner "
                                       "restores a group once demand stays below it)")
    if e.enabled and replicas is not None and e.max_group_size > replicas:
        r.bad(f"{path}.maxGroupSize", f"({e.max_group_size}) must be <= replicas ({replicas}): a group cannot "
                                      "have more members than the pool has replicas (maxGroupSize defaults to "
                                      "4; lower it, or set elasticity.enabled=false for a pool of one replica)")
    return e


def _engine(r: SpecReader, raw: Mapping[str, Any]) -> EngineSpec:
    path, d = "spec.engine", EngineSpec()
    block = r.int_(raw, "blockSize", path, d.block_size, 8, 32) or d.block_size
    if block not in (8, 16, 32):
        r.bad(f"{path}.blockSize", f"must be one of [8, 16, 32], got {block}")
    return EngineSpec(
        block_size=block,
        max_num_seqs=r.int_(raw, "maxNumSeqs", path, d.max_num_seqs, 1, 4096) or d.max_num_seqs,
        max_num_batched_tokens=r.int_(raw, "maxNumBatchedTokens", path, d.max_num_batched_tokens, 16, 1 << 20)
        or d.max_num_batched_tokens,
        max_model_len=r.int_(raw, "maxModelLen", path, None, 16, 1 << 20),
        gpu_memory_utilization=r.num(raw, "gpuMemoryUtilization", path, d.gpu_memory_utilization, 0.1, 0.99)
        or d.gpu_memory_utilization,
        memory_budget_bytes=r.int_(raw, "memoryBudgetBytes", path, None, 1 << 20, (1 << 63) - 1),
    )


Quantities = dict[str, str | int]


def _resources(r: SpecReader, raw: Mapping[str, Any]) -> tuple[Quantities, Quantities]:
    out: list[Quantities] = []
    for part in ("requests", "limits"):
        values: Quantities = {}
        for key, value in r.obj(raw, part, "spec.resources").items():
            if isinstance(value, bool) or not isinstance(value, int | str) or not _quantity_ok(value):
                r.bad(f"spec.resources.{part}.{key}", f"{value!r} is not a Kubernetes quantity")
            else:
                values[str(key)] = value
        out.append(values)
    requests, limits = out
    return requests, limits


def _quantity_ok(value: int | str) -> bool:
    try:
        parse_quantity(value)
    except ValueError:
        return False
    return True


def _gateway(r: SpecReader, raw: Mapping[str, Any]) -> GatewaySpec:
    replicas = r.int_(raw, "replicas", "spec.gateway", 1, 1, 64) or 1
    secret = None
    if "apiKeySecretRef" in raw:
        ref, path = r.obj(raw, "apiKeySecretRef", "spec.gateway"), "spec.gateway.apiKeySecretRef"
        name = r.str_(ref, "name", path, pattern=DNS_SUBDOMAIN, max_len=253, required=True)
        key = r.str_(ref, "key", path, pattern=SECRET_KEY, max_len=253, required=True)
        if name is not None and key is not None:
            secret = SecretKeyRef(name=name, key=key)
    return GatewaySpec(replicas=replicas, api_key_secret=secret)


def _autoscaling(r: SpecReader, spec: Mapping[str, Any], elasticity: Elasticity) -> Autoscaling | None:
    if "autoscaling" not in spec:
        return None
    raw, path, d = r.obj(spec, "autoscaling", "spec"), "spec.autoscaling", Autoscaling()
    if "maxReplicas" not in raw:
        r.bad(f"{path}.maxReplicas", "is required")
    a = Autoscaling(
        min_replicas=r.int_(raw, "minReplicas", path, d.min_replicas, 1, 1024) or d.min_replicas,
        max_replicas=r.int_(raw, "maxReplicas", path, d.max_replicas, 1, 1024) or d.max_replicas,
        target_demand=r.num(raw, "targetDemand", path, d.target_demand, 0, 4, exclusive_lo=True) or d.target_demand,
        scale_up_stabilization_s=r.int_(raw, "scaleUpStabilizationSeconds", path, d.scale_up_stabilization_s, 0,
                                        3600) or 0,
        scale_down_stabilization_s=r.int_(raw, "scaleDownStabilizationSeconds", path,
                                          d.scale_down_stabilization_s, 0, 3600) or 0,
        drain_timeout_s=r.int_(raw, "drainTimeoutSeconds", path, d.drain_timeout_s, 0, 3600) or 0,
        driver=r.enum(raw, "driver", path, Driver, d.driver) or d.driver,
    )
    if a.min_replicas > a.max_replicas:
        r.bad(f"{path}.minReplicas", f"({a.min_replicas}) must be <= autoscaling.maxReplicas ({a.max_replicas})")
    if elasticity.enabled and a.target_demand >= elasticity.drop_demand:
        r.bad(f"{path}.targetDemand", f"({a.target_demand}) must be lower than elasticity.dropDemand "
                                      f"({elasticity.drop_demand}): the pool is sized to carry its demand without "
                                      "drops")
    return a
