"""`kunserve operator`: run the KunServe operator (kopf) against the current cluster.

    kunserve operator                                  # every namespace (the Helm chart's default)
    kunserve operator -n serving -n staging            # only these namespaces (globs allowed)
    kunserve operator --liveness http://0.0.0.0:8080/healthz

Credentials: in-cluster service account, else $KUBECONFIG / ~/.kube/config (kopf's login). Operator
settings come from KUNSERVE_* variables (see kunserve.operator.config); the flags below override them.
With several operator replicas, kopf's peering keeps one active (--peering, --priority); --standalone
turns peering off.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from kunserve.operator.config import (
    ConfigError,
    OperatorConfig,
    parse_port,
    parse_pull_policy,
    parse_seconds,
    parse_secret_key_ref,
)

log = logging.getLogger("kunserve.operator")


def add_arguments(p: argparse.ArgumentParser) -> None:
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="serve ServingPools in every namespace (the default without --namespace)")
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="serve only this namespace (repeat for more; globs such as 'team-*' allowed)")
    p.add_argument("--liveness", metavar="URL", default=None,
                   help="serve kopf's liveness probe here, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--standalone", action="store_true", help="no peering with other operator replicas")
    p.add_argument("--peering", metavar="NAME", default=None, help="kopf peering object (several replicas)")
    p.add_argument("--priority", type=int, default=None, help="peering priority (the highest one is active)")
    p.add_argument("--agent-image", default=None, help="agent image when a pool names none [$KUNSERVE_AGENT_IMAGE]")
    p.add_argument("--gateway-image", default=None, help="gateway image [$KUNSERVE_GATEWAY_IMAGE]")
    p.add_argument("--image-pull-policy", default=None, help="Always | IfNotPresent | Never")
    p.add_argument("--redis", default=None, help="Redis URL of the gateways and topology [$KUNSERVE_REDIS_URL]")
    p.add_argument("--gateway-api-keys", default=None, metavar="SECRET/KEY",
                   help="default API key Secret of the gateways [$KUNSERVE_GATEWAY_API_KEYS]")
    p.add_argument("--resync-seconds", type=float, default=None, metavar="S",
                   help="re-apply every pool's workloads this often [$KUNSERVE_RESYNC_SECONDS, 60]")
    p.add_argument("--plan-seconds", type=float, default=None, metavar="S",
                   help="how often each pool's pressure is planned on [$KUNSERVE_PLAN_SECONDS, 2]")
    p.add_argument("--stale-seconds", type=float, default=None, metavar="S",
                   help="an agent silent for this long is stale [$KUNSERVE_STALE_SECONDS, 5]")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve the pools' autoscaling signals (kunserve_pool_*) on :PORT/metrics "
                        "[$KUNSERVE_METRICS_PORT; off]")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--log-format", choices=("plain", "full", "json"), default="full")
    from kunserve.operator.agent_client import add_tls_flags

    add_tls_flags(p)  # the operator's own calls to the agents (Status, WatchPressure, Prepare, Commit)


def build_config(args: argparse.Namespace, env: dict[str, str] | None = None) -> OperatorConfig:
    """KUNSERVE_* variables < flags; raises ConfigError on a malformed setting."""
    config = OperatorConfig.from_env(dict(os.environ) if env is None else env)
    return config.replace(
        agent_image=args.agent_image,
        gateway_image=args.gateway_image,
        image_pull_policy=parse_pull_policy(args.image_pull_policy) if args.image_pull_policy else None,
        redis_url=args.redis,
        gateway_api_keys=parse_secret_key_ref(args.gateway_api_keys) if args.gateway_api_keys else None,
        resync_interval_s=parse_seconds(str(args.resync_seconds)) if args.resync_seconds is not None else None,
        plan_interval_s=parse_seconds(str(args.plan_seconds), "plan interval") if args.plan_seconds is not None
        else None,
        stale_after_s=parse_seconds(str(args.stale_seconds), "stale threshold") if args.stale_seconds is not None
        else None,
        metrics_port=parse_port(str(args.metrics_port)) if getattr(args, "metrics_port", None) is not None else None,
    )


def kopf_run_options(args: argparse.Namespace) -> dict[str, Any]:
    """kopf.run() keyword arguments for the scope, liveness and peering flags."""
    return {
        "clusterwide": not args.namespace,
        "namespaces": list(args.namespace),
        "liveness_endpoint": args.liveness,
        "standalone": True if args.standalone else None,
        "peering_name": args.peering,
        "priority": args.priority,
    }


def run(args: argparse.Namespace) -> int:
    import kopf

    from kunserve.operator.agent_client import configure_tls_from_args
    from kunserve.operator.handlers import register

    try:
        config = build_config(args)
        configure_tls_from_args(args)  # a bad file fails at start, with the flag named
    except (ConfigError, ValueError) as exc:
        print(f"kunserve operator: {exc}", file=sys.stderr)
        return 2
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()], log_prefix=None)
    # kopf's default registry logs in the standard ways (service account, kubeconfig, or an installed
    # Kubernetes client library); a plain OperatorRegistry has no login at all.
    registry = kopf.get_default_registry()
    register(registry, config)
    scope = f"namespaces {', '.join(args.namespace)}" if args.namespace else "all namespaces"
    log.info("KunServe operator for %s (agent image %s, redis %s, planning every %ss)", scope, config.agent_image,
             config.redis_url, config.plan_interval_s)
    kopf.run(registry=registry, **kopf_run_options(args))
    return 0
