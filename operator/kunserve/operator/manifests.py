"""Pure builders of what a ServingPool owns: the agents' StatefulSet and headless Service, the gateway's
Deployment and Service. Input: the validated pool and the operator's settings; output: plain manifests
(JSON-ready dicts), each with an owner reference to the pool. No I/O, no defaults left to chance.
"""

from __future__ import annotations

from typing import Any

from kunserve.operator.config import OperatorConfig
from kunserve.operator.naming import (
    AGENT_GRPC_PORT,
    AGENT_METRICS_PORT,
    GATEWAY_HTTP_PORT,
    Component,
    agent_service_name,
    agent_statefulset_name,
    gateway_name,
    labels,
    selector_labels,
)
from kunserve.operator.pool_spec import API_VERSION, GPU_RESOURCE, KIND, ModelSource, PoolRef, ServingPool
from kunserve.operator.quantity import cpu_threads

Manifest = dict[str, Any]

MODEL_VOLUME = "model"
API_KEYS_VOLUME = "api-keys"
API_KEYS_DIR = "/etc/kunserve/api-keys"
API_KEYS_FILE = f"{API_KEYS_DIR}/keys"


def owner_reference(ref: PoolRef) -> dict[str, Any]:
    """Makes the pool the controller of a child: Kubernetes' garbage collector deletes the child with it."""
    return {"apiVersion": API_VERSION, "kind": KIND, "name": ref.name, "uid": ref.uid,
            "controller": True, "blockOwnerDeletion": True}


def _metadata(pool: ServingPool, name: str, component: Component) -> dict[str, Any]:
    return {"name": name, "namespace": pool.ref.namespace, "labels": labels(pool.ref.name, component),
            "ownerReferences": [owner_reference(pool.ref)]}


def pool_children(pool: ServingPool, config: OperatorConfig, replicas: int | None = None) -> list[Manifest]:
    """Everything the pool owns, in the order to create it (Services before their workloads); replicas: the
    agents' count when the autoscaler owns it (default spec.replicas)."""
    return [agent_headless_service(pool), agent_statefulset(pool, config, replicas),
            gateway_service(pool), gateway_deployment(pool, config)]


# ------------------------------------------------------------------------------------------------ shared

TLS_VOLUME, TLS_DIR = "tls", "/etc/kunserve/tls"
UID = 10001  # the images' non-root user
PRESTOP_SLEEP_S = 5  # endpoints and gateways stop sending new work before SIGTERM arrives


def tls_flags(config: OperatorConfig, server: bool) -> list[str]:
    """--tls-* flags of an agent (server) or a gateway for the mounted Secret; [] without TLS. Agents verify
    each other with the Secret's CA and, when mutual, require client certificates of it; gateways present
    the certificate only when mutual."""
    if config.tls_secret is None:
        return []
    flags: list[str] = []
    if server or config.tls_mutual:
        flags += ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"]
    if config.tls_mutual or not server:
        flags += ["--tls-ca", f"{TLS_DIR}/ca.crt"]
    if config.tls_server_name:
        flags += ["--tls-server-name", config.tls_server_name]
    return flags


def _harden(pod: dict[str, Any], container: dict[str, Any], scratch: list[str]) -> None:
    """Non-root, no privilege escalation, no capabilities, a read-only root filesystem with memory-backed
    or node-local scratch directories where the process writes (/tmp; /dev/shm for torch)."""
    pod["securityContext"] = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                              "seccompProfile": {"type": "RuntimeDefault"}}
    container["securityContext"] = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    container.setdefault("env", []).append({"name": "HOME", "value": "/tmp"})
    for i, path in enumerate(scratch):
        name = f"scratch-{i}"
        medium = {"medium": "Memory"} if path == "/dev/shm" else {}
        pod.setdefault("volumes", []).append({"name": name, "emptyDir": medium})
        container.setdefault("volumeMounts", []).append({"name": name, "mountPath": path})


def _mount_tls(pod: dict[str, Any], container: dict[str, Any], config: OperatorConfig) -> None:
    if config.tls_secret is not None:
        pod.setdefault("volumes", []).append({"name": TLS_VOLUME, "secret": {"secretName": config.tls_secret}})
        container.setdefault("volumeMounts", []).append({"name": TLS_VOLUME, "mountPath": TLS_DIR, "readOnly": True})


# ------------------------------------------------------------------------------------------------ agents


def agent_command(pool: ServingPool, config: OperatorConfig | None = None) -> list[str]:
    """`kunserve agent ...` from the pool's model and engine fields (flags of kunserve.agent.agent_cmd)."""
    spec, engine = pool.spec, pool.spec.engine
    command = [
        "kunserve", "agent",
        "--model", spec.model.path,
        "--model-name", spec.model.name,
        "--agent-id", "$(POD_NAME)",  # expanded by the kubelet from the env var below
        "--host", "0.0.0.0",
        "--port", str(AGENT_GRPC_PORT),
        "--metrics-port", str(AGENT_METRICS_PORT),
        "--device", "cuda" if spec.uses_gpus else "cpu",
        "--dtype", spec.model.dtype.value,
        "--block-size", str(engine.block_size),
        "--max-num-seqs", str(engine.max_num_seqs),
        "--max-num-batched-tokens", str(engine.max_num_batched_tokens),
    ]
    cpu = spec.limits.get("cpu", spec.requests.get("cpu"))
    if cpu is not None:  # torch would otherwise start a thread per core of the node
        command += ["--threads", str(cpu_threads(cpu))]
    if engine.max_model_len is not None:
        command += ["--max-model-len", str(engine.max_model_len)]
    if engine.memory_budget_bytes is not None:
        command += ["--memory-budget", str(engine.memory_budget_bytes)]
    elif spec.uses_gpus:
        command += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization)]
    if config is not None:
        command += tls_flags(config, server=True)
        # Peers reach a pod by its stable name through the headless Service.
        command += ["--advertise-host", f"$(POD_NAME).{agent_service_name(pool.ref.name)}.$(POD_NAMESPACE).svc"]
    command += ["--shutdown-grace", str(max(1, spec.termination_grace_period_s - PRESTOP_SLEEP_S - 5))]
    return command


def agent_resources(pool: ServingPool) -> dict[str, dict[str, str]]:
    """The pool's resources, with devicesPerReplica GPUs added as a limit on GPU pools that name none
    (an extended resource's request defaults to its limit)."""
    spec = pool.spec
    requests = {k: str(v) for k, v in spec.requests.items()}
    limits = {k: str(v) for k, v in spec.limits.items()}
    if spec.uses_gpus and GPU_RESOURCE not in limits:
        limits[GPU_RESOURCE] = str(spec.devices_per_replica)
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def _model_volume(source: ModelSource) -> dict[str, Any]:
    if source.pvc_claim is not None:
        return {"name": MODEL_VOLUME, "persistentVolumeClaim": {"claimName": source.pvc_claim, "readOnly": True}}
    return {"name": MODEL_VOLUME, "hostPath": {"path": source.host_path, "type": "Directory"}}


def _model_mount(source: ModelSource) -> dict[str, Any]:
    mount: dict[str, Any] = {"name": MODEL_VOLUME, "mountPath": source.mount_path, "readOnly": True}
    if source.pvc_sub_path:
        mount["subPath"] = source.pvc_sub_path
    return mount


def agent_statefulset(pool: ServingPool, config: OperatorConfig, replicas: int | None = None) -> Manifest:
    """The agents' StatefulSet with `replicas` pods (default spec.replicas; the autoscaler's count with
    spec.autoscaling)."""
    spec, name = pool.spec, pool.ref.name
    http_metrics = {"path": "/metrics", "port": "metrics"}
    container: dict[str, Any] = {
        "name": "agent",
        "image": spec.image or config.agent_image,
        "command": agent_command(pool, config),
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ],
        "ports": [{"name": "grpc", "containerPort": AGENT_GRPC_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": AGENT_METRICS_PORT, "protocol": "TCP"}],
        # /metrics is served only once the checkpoint is loaded and the gRPC server listens.
        "startupProbe": {"httpGet": http_metrics, "periodSeconds": 10, "failureThreshold": 180},
        "readinessProbe": {"httpGet": http_metrics, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
        "livenessProbe": {"tcpSocket": {"port": "grpc"}, "periodSeconds": 15, "timeoutSeconds": 5,
                          "failureThreshold": 4},
        # Gateways and the topology stop sending it work before SIGTERM; the agent then stops admitting,
        # finishes its streams within --shutdown-grace, and the gateway replays what is left elsewhere.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_S}}},
    }
    pull = spec.image_pull_policy or config.image_pull_policy
    if pull is not None:
        container["imagePullPolicy"] = pull.value
    resources = agent_resources(pool)
    if resources:
        container["resources"] = resources
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,  # agents never call the Kubernetes API
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": spec.termination_grace_period_s,
        "containers": [container],
    }
    if spec.model.source is not None:
        container["volumeMounts"] = [_model_mount(spec.model.source)]
        pod["volumes"] = [_model_volume(spec.model.source)]
    _mount_tls(pod, container, config)
    _harden(pod, container, ["/tmp", "/dev/shm"])
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.affinity:
        pod["affinity"] = dict(spec.affinity)
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(pool, agent_statefulset_name(name), Component.AGENT),
        "spec": {
            "replicas": spec.replicas if replicas is None else replicas,
            "serviceName": agent_service_name(name),
            "podManagementPolicy": "Parallel",  # replicas are independent: start and replace them together
            "selector": {"matchLabels": selector_labels(name, Component.AGENT)},
            "template": {"metadata": {"labels": labels(name, Component.AGENT)}, "spec": pod},
        },
    }


def agent_headless_service(pool: ServingPool) -> Manifest:
    """Per-pod DNS for the agents (gateway, operator and peers dial each agent directly)."""
    name = pool.ref.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(pool, agent_service_name(name), Component.AGENT),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # the operator reaches an agent before it reports ready
            "selector": selector_labels(name, Component.AGENT),
            "ports": [
                {"name": "grpc", "port": AGENT_GRPC_PORT, "targetPort": "grpc", "protocol": "TCP",
                 "appProtocol": "grpc"},
                {"name": "metrics", "port": AGENT_METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


# ----------------------------------------------------------------------------------------------- gateway


def gateway_command(pool: ServingPool, config: OperatorConfig) -> list[str]:
    spec = pool.spec
    command = [
        "kunserve", "gateway",
        "--pool", pool.ref.name,
        "--redis", config.redis_url,
        "--model-dir", spec.model.path,
        "--model-name", spec.model.name,
        "--host", "0.0.0.0",
        "--port", str(GATEWAY_HTTP_PORT),
    ]
    if spec.engine.max_model_len is not None:
        command += ["--max-model-len", str(spec.engine.max_model_len)]
    if (spec.gateway.api_key_secret or config.gateway_api_keys) is not None:
        command += ["--api-keys-file", API_KEYS_FILE]
    return command + tls_flags(config, server=False)


def gateway_deployment(pool: ServingPool, config: OperatorConfig) -> Manifest:
    spec, name = pool.spec, pool.ref.name
    health = {"path": "/health", "port": "http"}
    container: dict[str, Any] = {
        "name": "gateway",
        "image": config.effective_gateway_image,
        "command": gateway_command(pool, config),
        "ports": [{"name": "http", "containerPort": GATEWAY_HTTP_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": health, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
        "livenessProbe": {"httpGet": health, "initialDelaySeconds": 10, "periodSeconds": 15,
                          "timeoutSeconds": 5, "failureThreshold": 4},
    }
    if config.image_pull_policy is not None:
        container["imagePullPolicy"] = config.image_pull_policy.value
    mounts: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    if spec.model.source is not None:  # the gateway reads the tokenizer and config.json, never the weights
        mounts.append(_model_mount(spec.model.source))
        volumes.append(_model_volume(spec.model.source))
    secret = spec.gateway.api_key_secret or config.gateway_api_keys
    if secret is not None:
        mounts.append({"name": API_KEYS_VOLUME, "mountPath": API_KEYS_DIR, "readOnly": True})
        volumes.append({"name": API_KEYS_VOLUME, "secret": {
            "secretName": secret.name, "items": [{"key": secret.key, "path": "keys"}]}})
    if mounts:
        container["volumeMounts"] = mounts
    pod: dict[str, Any] = {"automountServiceAccountToken": False, "enableServiceLinks": False,
                           "containers": [container]}
    if volumes:
        pod["volumes"] = volumes
    _mount_tls(pod, container, config)
    _harden(pod, container, ["/tmp"])
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(pool, gateway_name(name), Component.GATEWAY),
        "spec": {
            "replicas": spec.gateway.replicas,
            "selector": {"matchLabels": selector_labels(name, Component.GATEWAY)},
            "template": {"metadata": {"labels": labels(name, Component.GATEWAY)}, "spec": pod},
        },
    }


def gateway_service(pool: ServingPool) -> Manifest:
    name = pool.ref.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(pool, gateway_name(name), Component.GATEWAY),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name, Component.GATEWAY),
            "ports": [{"name": "http", "port": GATEWAY_HTTP_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
