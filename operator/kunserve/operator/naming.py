"""Names, labels and ports of what the operator creates for a ServingPool (one place, so the manifest
builders, the status writer, the pressure collector and the executor agree on them).

For pool `smollm2` in namespace `ns`:

    StatefulSet  smollm2-agent      pods smollm2-agent-0, smollm2-agent-1, ...
    Service      smollm2-agents     headless: smollm2-agent-0.smollm2-agents.ns.svc:50051 (gRPC)
    Deployment   smollm2-gateway    the OpenAI-compatible gateway
    Service      smollm2-gateway    http://smollm2-gateway.ns.svc:8000
"""

from __future__ import annotations

from enum import StrEnum

LABEL_POOL = "kunserve.io/pool"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "kunserve-operator"  # managed-by label value and server-side-apply field manager

AGENT_GRPC_PORT = 50051
AGENT_METRICS_PORT = 9400
GATEWAY_HTTP_PORT = 8000


class Component(StrEnum):
    AGENT = "agent"
    GATEWAY = "gateway"


def agent_statefulset_name(pool: str) -> str:
    return f"{pool}-agent"


def agent_service_name(pool: str) -> str:
    return f"{pool}-agents"


def gateway_name(pool: str) -> str:
    """Name of both the gateway Deployment and its Service."""
    return f"{pool}-gateway"


def agent_pod_name(pool: str, ordinal: int) -> str:
    return f"{agent_statefulset_name(pool)}-{ordinal}"


def agent_endpoint(pool: str, namespace: str, ordinal: int) -> str:
    """host:port of one agent's gRPC server through the headless Service's per-pod DNS record."""
    return f"{agent_pod_name(pool, ordinal)}.{agent_service_name(pool)}.{namespace}.svc:{AGENT_GRPC_PORT}"


def selector_labels(pool: str, component: Component) -> dict[str, str]:
    """The immutable selector of the pool's StatefulSet / Deployment / Services."""
    return {LABEL_POOL: pool, LABEL_COMPONENT: component.value}


def labels(pool: str, component: Component) -> dict[str, str]:
    return {
        LABEL_NAME: "kunserve",
        LABEL_INSTANCE: pool,
        LABEL_COMPONENT: component.value,
        LABEL_PART_OF: "kunserve",
        LABEL_MANAGED_BY: MANAGER,
        LABEL_POOL: pool,
    }


def selector_string(pool: str, component: Component = Component.AGENT) -> str:
    """The selector in string form (the ServingPool's status.selector, for the scale subresource)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(pool, component).items()))
