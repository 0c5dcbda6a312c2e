"""The soak's controller process: local mode's `LocalController` (manual drops and restores from the Redis
request list, through the operator's executor, records in Redis, the topology published under new epochs),
plus what an operator restart does in Kubernetes: resume from what is persisted.

    python -m bench.soak.controller --redis URL --pool-file pool.yaml --endpoints '{"soak-agent-0": "host:port"}'

At start it recovers as the operator's local mode does (kunserve.operator.local_recovery): the pool's last
published epoch and groups, every unfinished reconfiguration record resumed by the executor, bounded in
attempts: a record whose outcome stays unknown is left as it is and counted by the invariant check.

`--reconcile-groups`: a group none of whose members has reported being in it for `--reconcile-grace` seconds
(a member crashed, the survivors disbanded themselves) is removed from the pool's groups and the topology is
published under a new epoch. The controller's own round does this (LocalController.forget_dissolved, from the
members' pressure; tests/soak/test_group_reconcile.py) and gets the grace period first; this check, from the
members' Status, stays as a safety net and each use is counted in Redis (`soak:{pool}:reconciled`) and
reported, never hidden: a count above 0 is a group the controller did not forget in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

import yaml
from redis.asyncio import Redis
from redis.exceptions import RedisError

from kunserve.operator.agent_client import AgentCallError, AgentClients
from kunserve.operator.executor import Executor, ExecutorSettings
from kunserve.operator.local import local_cost_model
from kunserve.operator.local_controller import LocalController
from kunserve.operator.local_recovery import recover
from kunserve.operator.pressure import PressureCollector
from kunserve.operator.validation import parse_pool

log = logging.getLogger("bench.soak.controller")


def reconciled_key(pool: str) -> str:
    return f"soak:{pool}:reconciled"


async def reconcile(ctl: LocalController, clients: AgentClients, since: dict[str, float], grace_s: float) -> None:
    """Forget groups none of whose members has reported being in them for grace_s (the controller's own
    forget_dissolved gets that long first; see the module docstring). since: group id -> first seen empty."""
    async with ctl.lock:
        broken = []
        now = time.monotonic()
        for g in ctl.groups:
            inside = 0
            for m in g.members:
                try:
                    st = await clients.status(ctl.endpoints[m], 5.0)
                except AgentCallError:
                    inside += 1  # cannot tell: not broken yet
                    continue
                inside += int(st.role.grouped and st.epoch == g.epoch)
            if inside:
                since.pop(g.id, None)
            elif now - since.setdefault(g.id, now) >= grace_s:
                broken.append(g)
        for gone in set(since) - {g.id for g in ctl.groups}:
            del since[gone]
        if not broken:
            return
        ctl.groups = tuple(g for g in ctl.groups if g not in broken)
        ctl.epoch = ctl.take_epoch()
        await ctl.publish()
        await ctl.redis.incrby(reconciled_key(ctl.name), len(broken))
        print(f"reconciled: groups {[g.id for g in broken]} have no members left; topology epoch {ctl.epoch}",
              flush=True)


async def serve(args: argparse.Namespace) -> int:
    raw = yaml.safe_load(Path(args.pool_file).read_text())
    raw.setdefault("metadata", {}).setdefault("namespace", "local")
    pool = parse_pool(raw)
    redis = Redis.from_url(args.redis, socket_connect_timeout=2, socket_timeout=10, decode_responses=True)
    clients = AgentClients(args.rpc_timeout)
    settings = ExecutorSettings(prepare_timeout_s=args.rpc_timeout, commit_timeout_s=args.rpc_timeout * 4,
                                abort_timeout_s=args.rpc_timeout, status_timeout_s=5.0)
    ctl = LocalController(pool=pool, redis=redis, endpoints=dict(json.loads(args.endpoints)),
                          cost=local_cost_model(pool), collector=PressureCollector(clients),
                          executor=Executor(clients, settings), out=lambda line: print(line, flush=True))
    ctl.collector.set_targets(ctl.endpoints)  # as local mode does: follow every agent's pressure
    while True:  # Redis may be restarting too
        try:
            recovery = await recover(ctl)
            break
        except (RedisError, OSError) as exc:
            print(f"recovery waits for Redis: {exc}", flush=True)
            await asyncio.sleep(0.5)
    print(f"controller up ({len(recovery.resumed)} resumed, {len(recovery.unknown)} left)", flush=True)
    empty_since: dict[str, float] = {}
    while True:
        try:
            await ctl.step()
            if args.reconcile_groups and ctl.groups:
                await reconcile(ctl, clients, empty_since, args.reconcile_grace)
        except (RedisError, OSError) as exc:
            print(f"round failed: {type(exc).__name__}: {exc}", flush=True)
            await asyncio.sleep(0.5)
        await asyncio.sleep(args.interval)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.soak.controller", description=__doc__.split("\n")[0])
    p.add_argument("--redis", required=True)
    p.add_argument("--pool-file", required=True)
    p.add_argument("--endpoints", required=True, help="JSON object: agent id -> host:port")
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--rpc-timeout", type=float, default=15.0)
    p.add_argument("--reconcile-groups", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--reconcile-grace", type=float, default=5.0,
                   help="seconds a group stays memberless before the harness forgets it")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
