"""Settings of the operator itself (not of a pool): images, Redis, gateway defaults.

The Helm chart sets them as environment variables of the operator's Deployment; `kunserve operator` flags
override them.

    KUNSERVE_AGENT_IMAGE          image of the agent pods when a ServingPool names none
    KUNSERVE_GATEWAY_IMAGE        image of the gateway pods (default: the agent image; one distribution)
    KUNSERVE_IMAGE_PULL_POLICY    pull policy of both when the pool names none (default: Kubernetes')
    KUNSERVE_REDIS_URL            the Redis the gateways (and the operator's topology writer) use
    KUNSERVE_GATEWAY_API_KEYS     default API key Secret of gateways, as NAME/KEY (a pool's
                                  spec.gateway.apiKeySecretRef wins); authentication is off without either
    KUNSERVE_RESYNC_SECONDS       how often every pool's workloads are re-applied (repairs drift such as a
                                  deleted Deployment); default 60
    KUNSERVE_PLAN_SECONDS         how often each pool's pressure is planned on (drop / restore); default 2
    KUNSERVE_STALE_SECONDS        an agent whose pressure is older than this is stale; default 5
    KUNSERVE_METRICS_PORT         serve the pools' autoscaling signals (kunserve_pool_*) on :PORT/metrics; off
                                  when unset
    KUNSERVE_TLS_SECRET           Secret (tls.crt, tls.key, ca.crt) mounted into agents and gateways at
                                  /etc/kunserve/tls: their gRPC runs over TLS; plaintext when unset
    KUNSERVE_TLS_MUTUAL           "true" (default): agents require client certificates of the Secret's CA
    KUNSERVE_TLS_SERVER_NAME      name expected in the agents' certificates (default: the host dialled)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kunserve.operator.pool_spec import PullPolicy, SecretKeyRef

DEFAULT_IMAGE = "kunserve:0.1.0"
DEFAULT_REDIS_URL = "redis://kunserve-redis:6379/0"


class ConfigError(ValueError):
    """An operator setting is malformed (a flag or a KUNSERVE_* variable)."""


@dataclass(slots=True, frozen=True)
class OperatorConfig:
    agent_image: str = DEFAULT_IMAGE
    gateway_image: str | None = None  # None: the agent image
    image_pull_policy: PullPolicy | None = None
    redis_url: str = DEFAULT_REDIS_URL
    gateway_api_keys: SecretKeyRef | None = None
    resync_interval_s: float = 60.0
    plan_interval_s: float = 2.0  # the pressure daemon's round
    stale_after_s: float = 5.0  # an agent silent for longer is stale (no new group, no restore of its group)
    pressure_interval_ms: int = 500  # asked of every agent's WatchPressure stream
    rpc_timeout_s: float = 10.0  # Status, Prepare and Abort deadlines
    commit_timeout_s: float = 300.0  # the leader's Commit deadline
    metrics_port: int | None = None  # the pools' autoscaling signals on http://0.0.0.0:PORT/metrics
    tls_secret: str | None = None  # gRPC TLS for the pools' agents and gateways from this Secret
    tls_mutual: bool = True  # agents require client certificates (mutual TLS)
    tls_server_name: str | None = None

    @property
    def effective_gateway_image(self) -> str:
        return self.gateway_image or self.agent_image

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OperatorConfig:
        values: dict[str, object] = {}
        if env.get("KUNSERVE_AGENT_IMAGE"):
            values["agent_image"] = env["KUNSERVE_AGENT_IMAGE"]
        if env.get("KUNSERVE_GATEWAY_IMAGE"):
            values["gateway_image"] = env["KUNSERVE_GATEWAY_IMAGE"]
        if env.get("KUNSERVE_IMAGE_PULL_POLICY"):
            values["image_pull_policy"] = parse_pull_policy(env["KUNSERVE_IMAGE_PULL_POLICY"])
        if env.get("KUNSERVE_REDIS_URL"):
            values["redis_url"] = env["KUNSERVE_REDIS_URL"]
        if env.get("KUNSERVE_GATEWAY_API_KEYS"):
            values["gateway_api_keys"] = parse_secret_key_ref(env["KUNSERVE_GATEWAY_API_KEYS"])
        if env.get("KUNSERVE_RESYNC_SECONDS"):
            values["resync_interval_s"] = parse_seconds(env["KUNSERVE_RESYNC_SECONDS"])
        if env.get("KUNSERVE_PLAN_SECONDS"):
            values["plan_interval_s"] = parse_seconds(env["KUNSERVE_PLAN_SECONDS"], "plan interval")
        if env.get("KUNSERVE_STALE_SECONDS"):
            values["stale_after_s"] = parse_seconds(env["KUNSERVE_STALE_SECONDS"], "stale threshold")
        if env.get("KUNSERVE_METRICS_PORT"):
            values["metrics_port"] = parse_port(env["KUNSERVE_METRICS_PORT"])
        if env.get("KUNSERVE_TLS_SECRET"):
            values["tls_secret"] = env["KUNSERVE_TLS_SECRET"]
        if env.get("KUNSERVE_TLS_MUTUAL"):
            values["tls_mutual"] = parse_bool(env["KUNSERVE_TLS_MUTUAL"], "KUNSERVE_TLS_MUTUAL")
        if env.get("KUNSERVE_TLS_SERVER_NAME"):
            values["tls_server_name"] = env["KUNSERVE_TLS_SERVER_NAME"]
        return cls(**values)  # type: ignore[arg-type]

    def replace(self, **changes: Any) -> OperatorConfig:
        """A copy with the given (non-None) settings changed."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def parse_bool(text: str, what: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ConfigError(f"{what} must be true or false, got {text!r}")


def parse_pull_policy(text: str) -> PullPolicy:
    try:
        return PullPolicy(text)
    except ValueError:
        raise ConfigError(f"image pull policy must be one of {[p.value for p in PullPolicy]}, got {text!r}") from None


def parse_seconds(text: str, what: str = "resync interval") -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 86400:
        raise ConfigError(f"{what} must be a number of seconds in (0, 86400), got {text!r}")
    return value


def parse_secret_key_ref(text: str) -> SecretKeyRef:
    name, sep, key = text.partition("/")
    if not sep or not name or not key:
        raise ConfigError(f"expected SECRET/KEY (e.g. kunserve-api-keys/keys), got {text!r}")
    return SecretKeyRef(name=name, key=key)


def parse_port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise ConfigError(f"metrics port must be in [1, 65535], got {text!r}")
    return value
