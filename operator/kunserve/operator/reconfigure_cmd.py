"""`kunserve reconfigure`: force a drop or a restore, exactly where you want it.

On a running `kunserve up` (the request goes through its controller, so it never races the planner):

    kunserve reconfigure drop --redis redis://127.0.0.1:PORT/0 --pool demo \\
        --members demo-agent-0,demo-agent-1 --ranges 0:15,15:30
    kunserve reconfigure restore --redis redis://127.0.0.1:PORT/0 --pool demo --group g1
    kunserve reconfigure status --redis redis://127.0.0.1:PORT/0 --pool demo

Directly on agents (no topology is written; the executor runs in this process):

    kunserve reconfigure drop --agents a0=127.0.0.1:50051,a1=127.0.0.1:50052 [--ranges 0:15,15:30]
    kunserve reconfigure restore --agents a0=127.0.0.1:50051          # the group a0 is in

--ranges defaults to an even split of the model's layers; --epoch to the next one. In Kubernetes, write a
Reconfiguration resource instead (deploy/examples/reconfiguration-drop.yaml). Exit status 0 when the
reconfiguration completed, 1 when it rolled back or failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from kunserve.operator.executor import ExecutorError, drop_group, restore_group
from kunserve.operator.local import records_key, reply_key, request_id, requests_key, state_key


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("drop", "restore", "status"))
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--redis", help="Redis URL of a running `kunserve up`")
    target.add_argument("--agents", help="id=host:port,... of the agents (drop: in pipeline order)")
    p.add_argument("--pool", default=None, help="pool name (with --redis; default: the only pool running there)")
    p.add_argument("--members", default=None, help="drop: agent ids in pipeline order (with --redis)")
    p.add_argument("--ranges", default=None, help="drop: layer ranges start:end,... one per member")
    p.add_argument("--group", default=None, help="group id (drop: its name; restore: which group)")
    p.add_argument("--epoch", type=int, default=None, help="epoch to commit (default: the next one)")
    p.add_argument("--reason", default=None, help="why (recorded with it)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the result")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


class UsageError(ValueError):
    pass


def parse_agents(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in (i.strip() for i in text.split(",")):
        name, sep, endpoint = item.partition("=")
        if not sep or not name or ":" not in endpoint:
            raise UsageError(f"--agents wants id=host:port,..., got {item!r}")
        out[name] = endpoint
    return out


def parse_ranges(text: str | None) -> list[tuple[int, int]] | None:
    if not text:
        return None
    try:
        return [(int(a), int(b)) for a, b in (r.split(":") for r in text.split(","))]
    except ValueError:
        raise UsageError(f"--ranges wants start:end,..., got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    try:
        result = asyncio.run(asyncio.wait_for(_run(args), args.timeout))
    except (UsageError, ExecutorError) as exc:
        print(f"kunserve reconfigure: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except TimeoutError:
        print(f"kunserve reconfigure: no result after {args.timeout} s", file=sys.stderr)
        return 1
    except (RedisError, OSError) as exc:
        print(f"kunserve reconfigure: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json or args.action == "status":
        print(json.dumps(result, indent=2))
    elif "error" in result:
        print(f"refused: {result['error']}")
    else:
        status = result["status"]
        print(f"{result['name']}: {status['phase']} — {status.get('message', '')}")
    if args.action == "status":
        return 0
    return 0 if (result.get("status") or {}).get("phase") == "Completed" else 1


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    if args.agents:
        return await _direct(args)
    redis = Redis.from_url(args.redis, socket_connect_timeout=3, decode_responses=True)
    try:
        return await _through_up(args, redis)
    finally:
        await redis.aclose()


async def _direct(args: argparse.Namespace) -> dict[str, Any]:
    agents = parse_agents(args.agents)
    options: dict[str, Any] = {"group_id": args.group}
    if args.reason:
        options["reason"] = args.reason
    if args.action == "drop":
        done = await drop_group(agents, parse_ranges(args.ranges), args.epoch, **options)
    elif args.action == "restore":
        done = await restore_group(agents, args.epoch, **options)
    else:
        raise UsageError("status needs --redis")
    return dict(json.loads(done.to_json()))


async def _through_up(args: argparse.Namespace, redis: Redis) -> dict[str, Any]:
    pool = args.pool
    if pool is None:
        pools = [k.removeprefix("kunserve:local:") async for k in redis.scan_iter("kunserve:local:*")]
        if len(pools) != 1:
            raise UsageError(f"name the pool with --pool (running there: {pools or 'none'})")
        pool = pools[0]
    raw_state = await redis.get(state_key(pool))
    if raw_state is None:
        raise UsageError(f"no `kunserve up` of pool {pool!r} runs on {args.redis}")
    state = json.loads(raw_state)
    if args.action == "status":
        history = await redis.hgetall(records_key(pool))
        state["reconfigurations"] = sorted((json.loads(v) for v in history.values()),
                                           key=lambda r: r["spec"]["epoch"])
        return dict(state)
    request: dict[str, Any] = {"id": request_id(), "action": "Drop" if args.action == "drop" else "Restore",
                               "group": args.group, "epoch": args.epoch, "reason": args.reason}
    if args.members:
        request["members"] = [m.strip() for m in args.members.split(",") if m.strip()]
    elif args.action == "drop":
        raise UsageError("a drop needs --members (agents: " + ", ".join(state["agents"]) + ")")
    request["ranges"] = parse_ranges(args.ranges)
    await redis.rpush(requests_key(pool), json.dumps(request))
    answer = await redis.blpop([reply_key(pool, request["id"])], timeout=max(int(args.timeout), 1))
    if answer is None:
        raise TimeoutError
    return dict(json.loads(answer[1]))
