"""`kunserve gateway`: the OpenAI-compatible HTTP gateway in front of a pool of agents.

    kunserve gateway --pool demo --redis redis://127.0.0.1:6379 --model-dir .models/smollm2-135m --port 8000
    kunserve gateway --model-dir DIR --static-topology agent-0=127.0.0.1:50051,agent-1=127.0.0.1:50052

The topology comes from Redis (written by the operator), or from --static-topology (then Redis, if
given, is only the request journal). API keys come from --api-keys-file and KUNSERVE_API_KEYS; with
neither, authentication is off (a warning says so). With --port 0 the OS picks a free port and
--ready-file tells which (JSON {"port", "pid"}, written once serving).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
from pathlib import Path

from kunserve.gateway.config import GatewayConfig, MiB
from kunserve.rpc.tls import TlsFiles

log = logging.getLogger("kunserve.gateway")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, required=True,
                   help="checkpoint directory: tokenizer, chat template, context length (no weights are read)")
    p.add_argument("--model-name", default="", help="model name clients send (default: the directory's name)")
    p.add_argument("--pool", default="default", help="ServingPool name (Redis keys kunserve:*:{pool})")
    p.add_argument("--redis", default=None, help="redis://host:port/db for the topology and the request journal")
    p.add_argument("--static-topology", default=None,
                   help="id=host:port,... or a YAML/JSON file in the topology document's shape")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0 = any free port)")
    p.add_argument("--api-keys-file", type=Path, default=None, help="one API key per line")
    p.add_argument("--max-body-bytes", type=int, default=1 * MiB)
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens accepted")
    p.add_argument("--max-queue", type=int, default=16,
                   help="a replica with this many waiting requests admits no more")
    p.add_argument("--max-replays", type=int, default=3, help="re-submissions of a request whose agent failed")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take in all")
    p.add_argument("--pressure-interval-ms", type=int, default=200)
    p.add_argument("--stale-after", type=float, default=2.0, metavar="S",
                   help="a replica whose pressure stream is silent this long is taken as stalled")
    p.add_argument("--ready-file", type=Path, default=None)
    p.add_argument("--log-level", default="INFO")
    from kunserve.rpc.tls import add_tls_arguments

    add_tls_arguments(p)


def build_config(args: argparse.Namespace) -> GatewayConfig:
    from kunserve.gateway.auth import ApiKeyError, load_api_keys
    from kunserve.gateway.topology import TopologyError
    from kunserve.gateway.topology_source import load_static
    from kunserve.rpc.tls import TlsError

    if not args.redis and not args.static_topology:
        raise SystemExit("kunserve gateway: give --redis (topology from the operator) or --static-topology")
    try:
        keys = load_api_keys(args.api_keys_file)
        model_name = args.model_name or args.model_dir.name
        static = load_static(args.static_topology, model_name) if args.static_topology else None
        return GatewayConfig(
            model_dir=args.model_dir, pool=args.pool, model_name=model_name, redis_url=args.redis,
            host=args.host, port=args.port, api_keys=keys, static_topology=static,
            max_body_bytes=args.max_body_bytes, max_model_len=args.max_model_len,
            max_tokens_limit=args.max_tokens_limit, max_queue=args.max_queue, max_replays=args.max_replays,
            request_timeout_s=args.request_timeout, pressure_interval_ms=args.pressure_interval_ms,
            stale_after_s=args.stale_after,
            tls=_tls(args))
    except (ApiKeyError, TopologyError, TlsError, ValueError) as exc:
        raise SystemExit(f"kunserve gateway: {exc}") from exc


def _tls(args: argparse.Namespace) -> TlsFiles | None:
    files = TlsFiles.from_args(args)
    if files is not None:
        files.read()  # a bad file fails at start, with the flag named
    return files


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = build_config(args)
    if not config.api_keys:
        log.warning("no API keys configured (--api-keys-file, KUNSERVE_API_KEYS): authentication is OFF")
    else:
        log.info("%d API key(s) loaded", len(config.api_keys))
    if config.redis_url is None:
        log.warning("no --redis: the request journal is off")
    try:
        return asyncio.run(serve(config, args.ready_file))
    except KeyboardInterrupt:
        return 0


async def serve(config: GatewayConfig, ready_file: Path | None = None) -> int:
    import uvicorn

    from kunserve.agent.errors import CheckpointError
    from kunserve.gateway.app import create_app
    from kunserve.gateway.config import ModelInfoError

    try:
        app = create_app(config)
    except (ModelInfoError, CheckpointError, OSError) as exc:
        print(f"kunserve gateway: {exc}", file=sys.stderr)
        return 1
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as exc:
        print(f"kunserve gateway: cannot bind {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=5))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if server.started:
        log.info("gateway for %s on http://%s:%d (pool %s)", config.model_name, config.host, port, config.pool)
        if ready_file is not None:
            tmp = ready_file.with_name(ready_file.name + ".tmp")
            tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
            tmp.replace(ready_file)
    await serving
    return 0 if server.started else 1
