"""`kunserve up`: serve a ServingPool on this machine without Kubernetes (local mode, see local.py).

    kunserve up -f deploy/examples/servingpool-smollm2.yaml              # gateway on http://127.0.0.1:8000
    kunserve up -f pool.yaml --port 0 --threads 1 --workdir /tmp/demo    # any free port; logs kept in /tmp/demo

It starts redis-server, one `kunserve agent` per replica and a `kunserve gateway`, prints the gateway's URL
once every agent serves, then plans drops and restores from the agents' pressure like the operator (each
one printed). Ctrl-C / SIGTERM stops everything it started. `kunserve reconfigure --redis URL --pool NAME`
forces a drop or restore on it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from kunserve.operator.local import LocalOptions, run_up


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--file", type=Path, required=True, help="ServingPool YAML (spec.model.path: a local dir)")
    p.add_argument("--host", default="127.0.0.1", help="address every process binds (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="the gateway's HTTP port (0 = any free port)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per agent (default: cores / replicas)")
    p.add_argument("--workdir", type=Path, default=None, help="logs and ready files (default: a temporary dir)")
    p.add_argument("--plan-seconds", type=float, default=1.0, help="how often the planner runs (default 1)")
    p.add_argument("--stale-seconds", type=float, default=5.0, help="an agent silent this long is stale")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for every process to serve")
    p.add_argument("--startup-delay", type=float, default=0.0, metavar="S",
                   help="seconds before a scale-out's agent process starts, as image pull and scheduling take in a "
                        "cluster (spec.autoscaling; default 0)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve the pool's autoscaling signals (kunserve_pool_*) on http://HOST:PORT/metrics")
    p.add_argument("--log-level", default="WARNING", help="of this process (children log to their files)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.port < 0 or args.plan_seconds <= 0 or args.stale_seconds <= 0 or (args.threads is not None
                                                                                and args.threads < 1):
        print("kunserve up: --port >= 0, --threads >= 1, --plan-seconds and --stale-seconds > 0")
        return 2
    options = LocalOptions(pool_file=args.file, host=args.host, port=args.port, threads=args.threads,
                           workdir=args.workdir, plan_interval_s=args.plan_seconds, stale_after_s=args.stale_seconds,
                           start_timeout_s=args.start_timeout, startup_delay_s=max(args.startup_delay, 0.0),
                           metrics_port=args.metrics_port)
    return asyncio.run(run_up(options))
