"""The manifest builders: exact objects for the examples, and every manifest valid for Kubernetes 1.37."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from kunserve.operator.config import OperatorConfig
from kunserve.operator.manifests import (
    agent_command,
    agent_headless_service,
    agent_statefulset,
    gateway_deployment,
    gateway_service,
    owner_reference,
    pool_children,
)
from kunserve.operator.naming import agent_endpoint, selector_string
from kunserve.operator.pool_spec import PoolRef, SecretKeyRef
from kunserve.operator.validation import parse_pool
from tests.operator.pools import GPU, example, with_spec

CONFIG = OperatorConfig(agent_image="registry.test/kunserve:1.0", redis_url="redis://redis.test:6379/0")
OWNER = {"apiVersion": "kunserve.io/v1alpha1", "kind": "ServingPool", "name": "smollm2", "uid": "uid-1",
         "controller": True, "blockOwnerDeletion": True}


def labels(component: str, pool: str = "smollm2") -> dict[str, str]:
    return {"app.kubernetes.io/name": "kunserve", "app.kubernetes.io/instance": pool,
            "app.kubernetes.io/component": component, "app.kubernetes.io/part-of": "kunserve",
            "app.kubernetes.io/managed-by": "kunserve-operator", "kunserve.io/pool": pool}


def meta(name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": "ns", "labels": labels(component), "ownerReferences": [OWNER]}


SMOLLM2_STATEFULSET: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "StatefulSet",
    "metadata": meta("smollm2-agent", "agent"),
    "spec": {
        "replicas": 2,
        "serviceName": "smollm2-agents",
        "podManagementPolicy": "Parallel",
        "selector": {"matchLabels": {"kunserve.io/pool": "smollm2", "app.kubernetes.io/component": "agent"}},
        "template": {
            "metadata": {"labels": labels("agent")},
            "spec": {
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "terminationGracePeriodSeconds": 60,
                "containers": [{
                    "name": "agent",
                    "image": "registry.test/kunserve:1.0",
                    "command": [
                        "kunserve", "agent", "--model", "/models/smollm2-135m",
                        "--model-name", "HuggingFaceTB/SmolLM2-135M-Instruct", "--agent-id", "$(POD_NAME)",
                        "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9400", "--device", "cpu",
                        "--dtype", "float32", "--block-size", "16", "--max-num-seqs", "16",
                        "--max-num-batched-tokens", "512", "--threads", "2", "--max-model-len", "2048",
                        "--memory-budget", "1073741824",
                        "--advertise-host", "$(POD_NAME).smollm2-agents.$(POD_NAMESPACE).svc", "--shutdown-grace", "50",
                    ],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "HOME", "value": "/tmp"},
                    ],
                    "ports": [{"name": "grpc", "containerPort": 50051, "protocol": "TCP"},
                              {"name": "metrics", "containerPort": 9400, "protocol": "TCP"}],
                    "startupProbe": {"httpGet": {"path": "/metrics", "port": "metrics"}, "periodSeconds": 10,
                                     "failureThreshold": 180},
                    "readinessProbe": {"httpGet": {"path": "/metrics", "port": "metrics"}, "periodSeconds": 5,
                                       "timeoutSeconds": 3, "failureThreshold": 3},
                    "livenessProbe": {"tcpSocket": {"port": "grpc"}, "periodSeconds": 15, "timeoutSeconds": 5,
                                      "failureThreshold": 4},
                    "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
                    "resources": {"requests": {"cpu": "2", "memory": "1536Mi"}, "limits": {"memory": "2Gi"}},
                    "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]}},
                    "volumeMounts": [{"name": "model", "mountPath": "/models", "readOnly": True},
                                     {"name": "scratch-0", "mountPath": "/tmp"},
                                     {"name": "scratch-1", "mountPath": "/dev/shm"}],
                }],
                "volumes": [{"name": "model", "hostPath": {"path": "/var/lib/kunserve/models", "type": "Directory"}},
                            {"name": "scratch-0", "emptyDir": {}},
                            {"name": "scratch-1", "emptyDir": {"medium": "Memory"}}],
                "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
            },
        },
    },
}

SMOLLM2_AGENT_SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": meta("smollm2-agents", "agent"),
    "spec": {
        "clusterIP": "None",
        "publishNotReadyAddresses": True,
        "selector": {"kunserve.io/pool": "smollm2", "app.kubernetes.io/component": "agent"},
        "ports": [{"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
                  {"name": "metrics", "port": 9400, "targetPort": "metrics", "protocol": "TCP"}],
    },
}

SMOLLM2_GATEWAY: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": meta("smollm2-gateway", "gateway"),
    "spec": {
        "replicas": 1,
        "selector": {"matchLabels": {"kunserve.io/pool": "smollm2", "app.kubernetes.io/component": "gateway"}},
        "template": {
            "metadata": {"labels": labels("gateway")},
            "spec": {
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "containers": [{
                    "name": "gateway",
                    "image": "registry.test/kunserve:1.0",
                    "command": [
                        "kunserve", "gateway", "--pool", "smollm2", "--redis", "redis://redis.test:6379/0",
                        "--model-dir", "/models/smollm2-135m", "--model-name", "HuggingFaceTB/SmolLM2-135M-Instruct",
                        "--host", "0.0.0.0", "--port", "8000", "--max-model-len", "2048",
                    ],
                    "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
                    "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5,
                                       "timeoutSeconds": 3, "failureThreshold": 3},
                    "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "initialDelaySeconds": 10,
                                      "periodSeconds": 15, "timeoutSeconds": 5, "failureThreshold": 4},
                    "env": [{"name": "HOME", "value": "/tmp"}],
                    "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]}},
                    "volumeMounts": [{"name": "model", "mountPath": "/models", "readOnly": True},
                                     {"name": "scratch-0", "mountPath": "/tmp"}],
                }],
                "volumes": [{"name": "model", "hostPath": {"path": "/var/lib/kunserve/models", "type": "Directory"}},
                            {"name": "scratch-0", "emptyDir": {}}],
                "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
            },
        },
    },
}

SMOLLM2_GATEWAY_SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": meta("smollm2-gateway", "gateway"),
    "spec": {
        "type": "ClusterIP",
        "selector": {"kunserve.io/pool": "smollm2", "app.kubernetes.io/component": "gateway"},
        "ports": [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}],
    },
}


def test_smollm2_children_exact() -> None:
    pool = parse_pool(example())
    assert agent_statefulset(pool, CONFIG) == SMOLLM2_STATEFULSET
    assert agent_headless_service(pool) == SMOLLM2_AGENT_SERVICE
    assert gateway_deployment(pool, CONFIG) == SMOLLM2_GATEWAY
    assert gateway_service(pool) == SMOLLM2_GATEWAY_SERVICE
    assert pool_children(pool, CONFIG) == [SMOLLM2_AGENT_SERVICE, SMOLLM2_STATEFULSET, SMOLLM2_GATEWAY_SERVICE,
                                           SMOLLM2_GATEWAY]


def test_owner_reference_and_naming() -> None:
    assert owner_reference(PoolRef("smollm2", "ns", "uid-1")) == OWNER
    assert agent_endpoint("smollm2", "ns", 1) == "smollm2-agent-1.smollm2-agents.ns.svc:50051"
    assert selector_string("smollm2") == "app.kubernetes.io/component=agent,kunserve.io/pool=smollm2"


def test_gpu_pool() -> None:
    pool = parse_pool(example(GPU))
    sts = agent_statefulset(pool, CONFIG)
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"] == {"requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"},
                                      "limits": {"memory": "64Gi", "nvidia.com/gpu": "1"}}
    assert container["command"][container["command"].index("--device") + 1] == "cuda"
    assert container["command"][-10:-4] == ["--max-num-batched-tokens", "8192", "--threads", "8",
                                            "--gpu-memory-utilization", "0.9"]
    assert container["volumeMounts"][0] == {"name": "model", "mountPath": "/models", "readOnly": True}
    assert pod["volumes"][0] == {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"] == 100
    assert pod["terminationGracePeriodSeconds"] == 300
    assert sts["spec"]["replicas"] == 8


def test_devices_per_replica_requests_gpus_when_resources_name_none() -> None:
    body = with_spec(with_spec(example(GPU), resources=None), devicesPerReplica=2,
                     resources={"requests": {"cpu": "500m"}})
    container = agent_statefulset(parse_pool(body), CONFIG)["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {"requests": {"cpu": "500m"}, "limits": {"nvidia.com/gpu": "2"}}
    assert container["command"][container["command"].index("--threads") + 1] == "1"  # at least one thread


def test_gpus_named_in_resources_win_over_devices_per_replica() -> None:
    body = with_spec(example(GPU), devicesPerReplica=2)  # resources ask for 1 GPU: the CRD says they win
    container = agent_statefulset(parse_pool(body), CONFIG)["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_cpu_pool_requests_no_gpu_and_omits_threads_without_cpu() -> None:
    body = with_spec(example(), resources=None)
    container = agent_statefulset(parse_pool(body), CONFIG)["spec"]["template"]["spec"]["containers"][0]
    assert "resources" not in container
    assert "--threads" not in agent_command(parse_pool(body))


def test_gateway_api_key_secret() -> None:
    pool = parse_pool(example(GPU))
    deployment = gateway_deployment(pool, CONFIG)
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert deployment["spec"]["replicas"] == 2
    assert container["command"][-2:] == ["--api-keys-file", "/etc/kunserve/api-keys/keys"]
    assert {"name": "api-keys", "mountPath": "/etc/kunserve/api-keys", "readOnly": True} in container["volumeMounts"]
    assert {"name": "api-keys", "secret": {"secretName": "kunserve-api-keys",
                                           "items": [{"key": "keys", "path": "keys"}]}} in pod["volumes"]


def test_operator_defaults_image_pull_policy_and_api_keys() -> None:
    config = OperatorConfig.from_env({"KUNSERVE_AGENT_IMAGE": "a:1", "KUNSERVE_GATEWAY_IMAGE": "g:1",
                                      "KUNSERVE_IMAGE_PULL_POLICY": "IfNotPresent",
                                      "KUNSERVE_GATEWAY_API_KEYS": "keys-secret/api-keys"})
    assert config.gateway_api_keys == SecretKeyRef("keys-secret", "api-keys")
    pool = parse_pool(with_spec(example(), image="custom:2", imagePullPolicy="Always"))
    agent = agent_statefulset(pool, config)["spec"]["template"]["spec"]["containers"][0]
    gateway_pod = gateway_deployment(pool, config)["spec"]["template"]["spec"]
    assert (agent["image"], agent["imagePullPolicy"]) == ("custom:2", "Always")
    assert (gateway_pod["containers"][0]["image"], gateway_pod["containers"][0]["imagePullPolicy"]) == (
        "g:1", "IfNotPresent")
    assert {"name": "api-keys", "secret": {"secretName": "keys-secret",
                                           "items": [{"key": "api-keys", "path": "keys"}]}} in gateway_pod["volumes"]


def test_pvc_sub_path_is_mounted() -> None:
    body = with_spec(example(GPU), model={"source": {"pvc": {"claimName": "models", "subPath": "llama"}}})
    mount = agent_statefulset(parse_pool(body), CONFIG)["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert mount[0] == {"name": "model", "mountPath": "/models", "readOnly": True, "subPath": "llama"}


def test_tls_secret_is_mounted_and_named_on_agent_and_gateway_commands() -> None:
    pool = parse_pool(example())
    mutual = CONFIG.replace(tls_secret="pool-tls", tls_server_name="kunserve-internal")
    sts = agent_statefulset(pool, mutual)["spec"]["template"]["spec"]
    gw = gateway_deployment(pool, mutual)["spec"]["template"]["spec"]
    for pod in (sts, gw):
        assert {"name": "tls", "secret": {"secretName": "pool-tls"}} in pod["volumes"]
        mounts = pod["containers"][0]["volumeMounts"]
        assert {"name": "tls", "mountPath": "/etc/kunserve/tls", "readOnly": True} in mounts
    agent, gateway = sts["containers"][0]["command"], gw["containers"][0]["command"]
    tls = ["--tls-cert", "/etc/kunserve/tls/tls.crt", "--tls-key", "/etc/kunserve/tls/tls.key",
           "--tls-ca", "/etc/kunserve/tls/ca.crt", "--tls-server-name", "kunserve-internal"]
    assert agent[agent.index("--tls-cert"):agent.index("--tls-cert") + 8] == tls
    assert gateway[-8:] == tls
    one_way = CONFIG.replace(tls_secret="pool-tls", tls_mutual=False)
    assert gateway_deployment(pool, one_way)["spec"]["template"]["spec"]["containers"][0]["command"][-2:] == [
        "--tls-ca", "/etc/kunserve/tls/ca.crt"]  # verifies the agents, presents no certificate
    plain = agent_statefulset(pool, CONFIG)["spec"]["template"]["spec"]["containers"][0]["command"]
    assert not any(a.startswith("--tls") for a in plain)


BODIES: dict[str, dict[str, Any]] = {
    "smollm2": example(),
    "gpu": example(GPU),
    "gpu-tp2": with_spec(example(GPU), devicesPerReplica=2, resources=None, gateway={"apiKeySecretRef": None}),
    "no-source": with_spec(example(), model={"source": None}, resources=None),
}


@pytest.mark.parametrize("case", sorted(BODIES))
def test_manifests_validate_against_kubernetes_schemas(case: str) -> None:
    for manifest in pool_children(parse_pool(BODIES[case]), CONFIG):
        kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)


def test_validation_is_strict_enough_to_catch_a_typo() -> None:
    broken = copy.deepcopy(SMOLLM2_STATEFULSET)
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)
