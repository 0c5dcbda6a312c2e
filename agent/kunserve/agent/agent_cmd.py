"""`kunserve agent`: one agent process — the engine, its gRPC services and /metrics.

Settings come from flags or a YAML file (--config; flags given on the command line win). With --port 0
the OS picks a free port; --ready-file then tells a supervisor which ports were bound, written once the
agent serves. SIGTERM / SIGINT stop it gracefully (running streams get a few seconds to finish).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("kunserve.agent")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
          "T": 1000**4, "TB": 1000**4, "KI": 1024, "KIB": 1024, "MI": 1024**2, "MIB": 1024**2,
          "GI": 1024**3, "GIB": 1024**3, "TI": 1024**4, "TIB": 1024**4}


def parse_size(text: str | int) -> int:
    """Bytes from 123, '512MiB', '2GB', '1.5GiB'."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1073741824, 512MiB, 2GB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


# flag name -> (type, default, help). Also the keys accepted in --config (with - or _).
OPTIONS: dict[str, tuple[Any, Any, str]] = {
    "model": (str, None, "checkpoint directory (required)"),
    "model-name": (str, None, "name reported to clients (default: the directory's name)"),
    "agent-id": (str, None, "unique id in the pool (default: hostname-pid)"),
    "host": (str, "127.0.0.1", "address to bind gRPC and /metrics on"),
    "port": (int, 50051, "gRPC port (0 = any free port)"),
    "metrics-port": (int, 9400, "/metrics port (0 = any free port, -1 = off)"),
    "device": (str, "auto", "auto | cpu | cuda | cuda:N"),
    "dtype": (str, "float32", "float32 | bfloat16 | float16"),
    "threads": (int, None, "torch CPU threads (set it: cores are shared between agents)"),
    "block-size": (int, 16, "tokens per KV block"),
    "max-num-seqs": (int, 64, "running requests at most"),
    "max-num-batched-tokens": (int, 512, "tokens per engine step"),
    "max-model-len": (int, None, "context length (default: the model's)"),
    "memory-budget": (parse_size, None, "device memory budget B (e.g. 2GiB); default: per device"),
    "num-kv-blocks": (int, None, "fixed KV pool size in blocks (overrides the budget)"),
    "gpu-memory-utilization": (float, 0.9, "fraction of free CUDA memory for the budget"),
    "seed": (int, None, "sampler seed for requests without one"),
    "ready-file": (str, None, "write {grpc_port, metrics_port, agent_id, pid} here (JSON) once serving"),
    "advertise-host": (str, None, "host peers reach this agent at (default: --host)"),
    "pipeline-depth": (int, 2, "micro-batches in flight while leading a cooperative group"),
    "kv-exchange-bytes": (parse_size, 8 << 20, "KV bytes one exchange step moves at most (the bound per step)"),
    "rpc-timeout": (float, 30.0, "deadline in seconds of every call between agents"),
    "restore-weights-from": (str, "checkpoint", "checkpoint (the local host copy) | peers (pull from the group)"),
    "shutdown-grace": (float, 5.0, "on SIGTERM: seconds open streams get to finish before they are cut"),
    "preemption-mode": (str, "recompute", "recompute | swap (baseline: KV to host memory, PCIe modelled)"),
    "swap-bandwidth": (parse_size, 16 * 1000**3, "modelled host link bytes/s for --preemption-mode swap"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML file with any of the options below")
    for name, (typ, _default, help_text) in OPTIONS.items():
        p.add_argument(f"--{name}", type=typ, default=None, help=help_text)
    p.add_argument("--log-level", default="INFO")
    from kunserve.rpc.tls import add_tls_arguments

    add_tls_arguments(p, server=True)


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < config file < flags. Raises SystemExit with a clear message on bad input."""
    settings = {name: default for name, (_t, default, _h) in OPTIONS.items()}
    if args.config is not None:
        try:
            raw = yaml.safe_load(args.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SystemExit(f"kunserve agent: cannot read {args.config}: {exc}") from exc
        if not isinstance(raw, dict):
            raise SystemExit(f"kunserve agent: {args.config}: expected a mapping of options")
        for key, value in raw.items():
            name = str(key).replace("_", "-")
            if name not in OPTIONS:
                raise SystemExit(f"kunserve agent: {args.config}: unknown option {key!r}")
            settings[name] = OPTIONS[name][0](value) if value is not None else None
    for name in OPTIONS:
        value = getattr(args, name.replace("-", "_"))
        if value is not None:
            settings[name] = value
    if not settings["model"]:
        raise SystemExit("kunserve agent: --model (or model: in --config) is required")
    settings["agent-id"] = settings["agent-id"] or f"{socket.gethostname()}-{os.getpid()}"
    settings["model-name"] = settings["model-name"] or Path(settings["model"]).name
    return settings


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = resolve(args)
    from kunserve.rpc.tls import TlsError, TlsFiles

    try:
        settings["tls"] = TlsFiles.from_args(args)
        if settings["tls"] is not None:
            settings["tls"].read()  # a bad file fails here, with the flag named, not at the first handshake
    except TlsError as exc:
        print(f"kunserve agent: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(settings))
    except KeyboardInterrupt:
        return 0


async def _serve(s: dict[str, Any]) -> int:
    import grpc
    from prometheus_client import start_http_server

    from kunserve.agent import channels
    from kunserve.agent.engine.config import EngineConfig
    from kunserve.agent.engine.llm_engine import LLMEngine
    from kunserve.agent.engine_loop import EngineLoop
    from kunserve.agent.errors import KunServeError
    from kunserve.agent.member import Member
    from kunserve.agent.metrics import AgentMetrics
    from kunserve.agent.peer import PeerServicer
    from kunserve.agent.service import AgentServicer, InferenceServicer
    from kunserve.rpc.options import message_limits
    from kunserve.rpc.tls import add_port, describe
    from kunserve.rpc.v1 import agent_pb2_grpc, inference_pb2_grpc, peer_pb2_grpc

    config = EngineConfig(
        model=s["model"], dtype=s["dtype"], device=s["device"], block_size=s["block-size"],
        max_num_seqs=s["max-num-seqs"], max_num_batched_tokens=s["max-num-batched-tokens"],
        max_model_len=s["max-model-len"], memory_budget_bytes=s["memory-budget"], num_kv_blocks=s["num-kv-blocks"],
        gpu_memory_utilization=s["gpu-memory-utilization"], seed=s["seed"], torch_threads=s["threads"],
        progress=sys.stderr.isatty(),
    )
    try:
        engine = LLMEngine(config)
    except (KunServeError, ValueError) as exc:
        print(f"kunserve agent: {exc}", file=sys.stderr)
        return 1
    if s["preemption-mode"] not in ("recompute", "swap"):
        print(f"kunserve agent: --preemption-mode must be recompute or swap, not {s['preemption-mode']!r}",
              file=sys.stderr)
        return 1
    if s["preemption-mode"] == "swap":
        from kunserve.agent.engine.swap import enable_swap

        enable_swap(engine, float(s["swap-bandwidth"]))
    metrics = AgentMetrics(engine, s["model-name"])
    loop = EngineLoop(engine, observer=metrics.observe)
    loop.start()
    keepalive = [  # accept the gateways' keepalive pings
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 0),
    ]
    server = grpc.aio.server(options=message_limits() + keepalive)
    channels.configure(s["tls"])  # the agent's own calls to its peers use the same files
    try:
        port = add_port(server, f"{s['host']}:{s['port']}", s["tls"])
    except RuntimeError:
        port = 0
    if port == 0:
        print(f"kunserve agent: cannot bind {s['host']}:{s['port']}", file=sys.stderr)
        loop.stop()
        return 1
    endpoint = f"{s['advertise-host'] or s['host']}:{port}"
    member = Member(loop, s["agent-id"], endpoint, rpc_timeout_s=s["rpc-timeout"], depth=s["pipeline-depth"],
                    exchange_bytes=s["kv-exchange-bytes"], restore_from=s["restore-weights-from"])
    member.aio_loop = asyncio.get_running_loop()
    metrics.follow(member)
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(loop, member), server)
    agent_servicer = AgentServicer(loop, s["agent-id"], s["model-name"], member)
    agent_pb2_grpc.add_AgentServicer_to_server(agent_servicer, server)
    peer_pb2_grpc.add_PeerServicer_to_server(PeerServicer(loop, member), server)
    from kunserve.agent.migrate import MigrationServicer
    from kunserve.rpc.v1 import migration_pb2_grpc

    migration = MigrationServicer(loop, endpoint, s["rpc-timeout"])
    migration_pb2_grpc.add_MigrationServicer_to_server(migration, server)
    await server.start()
    metrics_port = -1
    if s["metrics-port"] >= 0:
        http, _thread = start_http_server(s["metrics-port"], addr=s["host"], registry=metrics.registry)
        metrics_port = http.server_port
    if s["ready-file"]:
        ready = {"agent_id": s["agent-id"], "grpc_port": port, "metrics_port": metrics_port, "pid": os.getpid()}
        tmp = Path(s["ready-file"] + ".tmp")
        tmp.write_text(json.dumps(ready))
        tmp.replace(s["ready-file"])
    log.info("agent %s ready: grpc %s:%d (%s), metrics %s, %d KV blocks", s["agent-id"], s["host"], port,
             describe(s["tls"]),
             f"{s['host']}:{metrics_port}/metrics" if metrics_port >= 0 else "off", engine.block_manager.num_blocks)
    stop = asyncio.Event()
    aio_loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        aio_loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("agent %s stopping", s["agent-id"])
    agent_servicer.close()
    await server.stop(grace=s["shutdown-grace"])
    await migration.close()
    loop.stop()
    return 0
