"""Local mode: a ServingPool on one machine without Kubernetes (`kunserve up -f pool.yaml`).

`LocalPool` starts, from the same ServingPool YAML the operator reads:
- a real `redis-server` on a free loopback port (persistence off): the topology and the request journal;
- the pool's agents, `kunserve agent` processes named like the pods would be (`{pool}-agent-{i}`), each on a
  free port, with the pool's engine settings (block size, batch limits, memory budget);
- one `kunserve gateway` on `--port`, reading the topology from that Redis;
and runs `LocalController`: the same pressure collector → planner → executor loop as the operator, without
the Kubernetes API. Each reconfiguration is printed and stored in Redis (hash `kunserve:reconfigurations:{pool}`,
one JSON record per reconfiguration: spec and status as a Reconfiguration resource would have them, saved
after every step). Manual reconfigurations (`kunserve reconfigure --redis ... --pool ...`) arrive on the
list `kunserve:reconfigure:{pool}:requests` and are run by the same loop, so they never race the planner's;
the answer goes to `kunserve:reconfigure:{pool}:reply:{id}`. `kunserve:local:{pool}` describes the running
pool (agents' endpoints, gateway URL, epoch, groups).

Children run in their own session (a Ctrl-C reaches only `kunserve up`, which stops them in order: gateway,
agents, Redis) and, on Linux, die with it if it is killed. Everything it started is stopped on SIGINT / SIGTERM
and on its own failure (a child that exits, a start that times out).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import start_http_server
from redis.asyncio import Redis
from redis.exceptions import RedisError

from kunserve.operator.agent_client import AgentClients
from kunserve.operator.autoscale_status import PoolMetrics
from kunserve.operator.controller import replica_names
from kunserve.operator.cost_model import CostModel
from kunserve.operator.executor import Executor, ExecutorSettings
from kunserve.operator.local_controller import (
    ControlEvent,
    LocalController,
    RedisRecordStore,
    Scaler,
    records_key,
    reply_key,
    requests_key,
    state_key,
)
from kunserve.operator.pool_spec import Dtype, InvalidServingPool, ServingPool
from kunserve.operator.pressure import PressureCollector
from kunserve.operator.validation import parse_pool

__all__ = ["ControlEvent", "LocalController", "LocalModeError", "LocalOptions", "LocalPool", "RedisRecordStore",
           "Scaler", "records_key", "reply_key", "request_id", "requests_key", "run_up", "state_key"]
log = logging.getLogger("kunserve.local")
KUNSERVE = "import sys; from kunserve.cli import main; sys.exit(main(sys.argv[1:]))"
# The same, for children started once gRPC threads run here (a scale-out): no Python code may run between fork and
# exec then, so the child asks for SIGTERM on its parent's death itself (Linux).
DIE_WITH_PARENT = ("import ctypes, signal, sys; "
                   "sys.platform == 'linux' and ctypes.CDLL(None).prctl(1, signal.SIGTERM); ")
DTYPE_BYTES = {Dtype.FLOAT32: 4, Dtype.BFLOAT16: 2, Dtype.FLOAT16: 2}
STOP_GRACE_S = 10.0


class LocalModeError(RuntimeError):
    """Local mode cannot start or had to stop (the message says why)."""


@dataclass(slots=True, frozen=True)
class LocalOptions:
    pool_file: Path
    host: str = "127.0.0.1"
    port: int = 8000  # the gateway's HTTP port (0: any free port)
    threads: int | None = None  # torch threads per agent (default: the cores shared evenly)
    workdir: Path | None = None  # logs and ready files (default: a new temporary directory)
    plan_interval_s: float = 1.0
    pressure_interval_ms: int = 250
    stale_after_s: float = 5.0
    start_timeout_s: float = 300.0
    redis_server: str = "redis-server"
    rpc_timeout_s: float = 30.0
    commit_timeout_s: float = 300.0
    startup_delay_s: float = 0.0  # before a scale-out's agent process starts (image pull, scheduling)
    metrics_port: int | None = None  # the pool's autoscaling signals on http://host:port/metrics


def load_pool(path: Path) -> ServingPool:
    """The ServingPool in a YAML file, validated like the operator does; the model directory must exist here."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise LocalModeError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("kind") != "ServingPool":
        raise LocalModeError(f"{path}: expected a ServingPool (kind: ServingPool)")
    raw.setdefault("metadata", {}).setdefault("namespace", "local")
    try:
        pool = parse_pool(raw)
    except InvalidServingPool as exc:
        raise LocalModeError(f"{path}: invalid ServingPool: {exc}") from exc
    if not (model_dir(pool) / "config.json").is_file():
        raise LocalModeError(f"{path}: spec.model.path {model_dir(pool)} has no config.json (in local mode it is a "
                             "directory on this machine)")
    return pool


def model_dir(pool: ServingPool) -> Path:
    return Path(pool.spec.model.path).expanduser().resolve()


def local_cost_model(pool: ServingPool) -> CostModel:
    config = json.loads((model_dir(pool) / "config.json").read_text())
    return CostModel.from_hf_config(config, DTYPE_BYTES[pool.spec.model.dtype], block_size=pool.spec.engine.block_size)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def source_path() -> str:
    """PYTHONPATH for children: the roots of the `kunserve` namespace package (installed or not)."""
    import kunserve

    roots = [str(Path(p).parent) for p in kunserve.__path__]
    existing = os.environ.get("PYTHONPATH")
    return os.pathsep.join([*roots, *([existing] if existing else [])])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when `kunserve up` dies, even by SIGKILL (prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def agent_command(pool: ServingPool, agent_id: str, ready_file: Path, threads: int, host: str) -> list[str]:
    spec, engine = pool.spec, pool.spec.engine
    cmd = [sys.executable, "-c", KUNSERVE, "agent", "--model", str(model_dir(pool)), "--model-name",
           spec.model.name, "--agent-id", agent_id, "--host", host, "--port", "0", "--metrics-port", "0",
           "--device", "cuda" if spec.uses_gpus else "cpu", "--dtype", spec.model.dtype.value,
           "--block-size", str(engine.block_size), "--max-num-seqs", str(engine.max_num_seqs),
           "--max-num-batched-tokens", str(engine.max_num_batched_tokens), "--threads", str(threads),
           "--ready-file", str(ready_file)]
    if engine.max_model_len is not None:
        cmd += ["--max-model-len", str(engine.max_model_len)]
    if engine.memory_budget_bytes is not None:
        cmd += ["--memory-budget", str(engine.memory_budget_bytes)]
    elif spec.uses_gpus:
        cmd += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization)]
    return cmd


def gateway_command(pool: ServingPool, redis_url: str, ready_file: Path, host: str, port: int) -> list[str]:
    cmd = [sys.executable, "-c", KUNSERVE, "gateway", "--model-dir", str(model_dir(pool)), "--model-name",
           pool.spec.model.name, "--pool", pool.ref.name, "--redis", redis_url, "--host", host, "--port", str(port),
           "--ready-file", str(ready_file)]
    if pool.spec.engine.max_model_len is not None:
        cmd += ["--max-model-len", str(pool.spec.engine.max_model_len)]
    return cmd


@dataclass(slots=True)
class Child:
    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    ready_file: Path | None = None
    retired: bool = False  # stopped on purpose (scale-in): its exit is not a failure

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# --------------------------------------------------------------------------------------------------- the pool


class LocalPool:
    def __init__(self, pool: ServingPool, options: LocalOptions, out: Callable[[str], None] | None = None) -> None:
        self.pool = pool
        self.options = options
        self.out = out or (lambda line: print(f"kunserve up: {line}", flush=True))
        self.workdir = options.workdir or Path(tempfile.mkdtemp(prefix=f"kunserve-{pool.ref.name}-"))
        self.children: list[Child] = []
        self.redis: Redis | None = None
        self.redis_url = ""
        self.endpoints: dict[str, str] = {}
        self.gateway_url = ""
        self.stopping = False
        self.ctl: LocalController | None = None
        self.starting: dict[str, asyncio.Task[None]] = {}  # scale-out agents not serving yet
        self.changed = asyncio.Event()  # the set of children changed (the supervisor re-reads it)
        self.metrics = PoolMetrics()
        self.serving = asyncio.Event()  # set once the topology is published and the gateway routes

    @property
    def name(self) -> str:
        return self.pool.ref.name

    @property
    def initial_replicas(self) -> int:
        scaling = self.pool.spec.autoscaling
        replicas = self.pool.spec.replicas
        return replicas if scaling is None else min(max(replicas, scaling.min_replicas), scaling.max_replicas)

    @property
    def threads(self) -> int:
        return self.options.threads or max(1, (os.cpu_count() or 1) // self.initial_replicas)

    async def scale_to(self, replicas: int) -> None:
        """Start agents up to `replicas` (each after startup_delay_s, in the background; it joins the pool once it
        serves) and stop those above it (the controller took them out of the topology first)."""
        wanted = set(replica_names(self.name, replicas))
        for agent_id in replica_names(self.name, replicas):
            running = any(c.name == agent_id and not c.retired for c in self.children)
            if not running and agent_id not in self.starting:
                self.out(f"scale-out: starting {agent_id} (ready in {self.options.startup_delay_s:.0f} s + load)")
                self.starting[agent_id] = asyncio.create_task(self._start_late(agent_id), name=f"start-{agent_id}")
        for agent_id, task in list(self.starting.items()):
            if agent_id not in wanted:
                task.cancel()
                del self.starting[agent_id]
        for child in self.children:
            if child.name.startswith(f"{self.name}-agent-") and child.name not in wanted and not child.retired:
                child.retired = True
                self.out(f"scale-in: stopping {child.name}")
                asyncio.create_task(self._stop(child))  # noqa: RUF006 - _stop is bounded; shutdown waits too
        self.changed.set()

    async def _start_late(self, agent_id: str) -> None:
        await asyncio.sleep(self.options.startup_delay_s)  # what image pull and scheduling take in a cluster
        ready = self.workdir / f"{agent_id}.ready.json"
        ready.unlink(missing_ok=True)
        child = await self._spawn(agent_id, agent_command(self.pool, agent_id, ready, self.threads, self.options.host),
                                  ready, late=True)
        self.changed.set()
        info = await self._wait_ready(child, time.monotonic() + self.options.start_timeout_s)
        endpoint = f"{self.options.host}:{info['grpc_port']}"
        self.endpoints[agent_id] = endpoint
        self.out(f"agent {agent_id} ready on {endpoint}")
        if self.ctl is not None:
            await self.ctl.add_replica(agent_id, endpoint)
        self.starting.pop(agent_id, None)

    async def _spawn(self, name: str, cmd: list[str], ready_file: Path | None = None, late: bool = False) -> Child:
        log_path = self.workdir / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": source_path()}
        if late and cmd[1:3] == ["-c", KUNSERVE]:
            cmd = [cmd[0], "-c", DIE_WITH_PARENT + KUNSERVE, *cmd[3:]]
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=asyncio.subprocess.STDOUT, env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" and not late else None)
        child = Child(name, proc, log_path, ready_file)
        self.children.append(child)
        self._write_processes()
        return child

    def _write_processes(self) -> None:
        data = {c.name: c.proc.pid for c in self.children}
        (self.workdir / "processes.json").write_text(json.dumps(data))

    async def _wait_ready(self, child: Child, deadline: float) -> dict[str, Any]:
        assert child.ready_file is not None
        while not child.ready_file.exists():
            if child.proc.returncode is not None:
                raise LocalModeError(f"{child.name} exited with code {child.proc.returncode} while starting; "
                                     f"its log ({child.log_path}):\n{child.log_tail()}")
            if time.monotonic() > deadline:
                raise LocalModeError(f"{child.name} not ready after {self.options.start_timeout_s:.0f} s; "
                                     f"its log ({child.log_path}):\n{child.log_tail()}")
            await asyncio.sleep(0.05)
        info: dict[str, Any] = json.loads(child.ready_file.read_text())
        return info

    async def start_redis(self) -> None:
        port = free_port(self.options.host)
        cmd = [self.options.redis_server, "--port", str(port), "--bind", self.options.host, "--save", "",
               "--appendonly", "no", "--dir", str(self.workdir)]
        try:
            child = await self._spawn("redis", cmd)
        except FileNotFoundError as exc:
            raise LocalModeError(f"{self.options.redis_server} not found: install Redis (apt-get install "
                                 "redis-server)") from exc
        self.redis_url = f"redis://{self.options.host}:{port}/0"
        self.redis = Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=10,
                                    decode_responses=True)
        deadline = time.monotonic() + 15
        while True:
            try:
                if await self.redis.ping():
                    return
            except (RedisError, OSError):
                pass
            if child.proc.returncode is not None or time.monotonic() > deadline:
                raise LocalModeError(f"redis-server did not start; its log:\n{child.log_tail()}")
            await asyncio.sleep(0.05)

    async def start(self) -> None:
        """Redis, the agents, the gateway; returns once all serve (raises LocalModeError otherwise)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        spec = self.pool.spec
        ids = replica_names(self.name, self.initial_replicas)
        threads = self.threads
        self.out(f"pool {self.name}: {spec.replicas} agents of {spec.model.name} ({model_dir(self.pool)}), "
                 f"{threads} thread(s) each; logs in {self.workdir}")
        await self.start_redis()
        self.out(f"redis on {self.redis_url}")
        deadline = time.monotonic() + self.options.start_timeout_s
        agents = [await self._spawn(a, agent_command(self.pool, a, self.workdir / f"{a}.ready.json", threads,
                                                     self.options.host), self.workdir / f"{a}.ready.json")
                  for a in ids]
        infos = await asyncio.gather(*(self._wait_ready(c, deadline) for c in agents))
        for agent_id, info in zip(ids, infos, strict=True):
            self.endpoints[agent_id] = f"{self.options.host}:{info['grpc_port']}"
            self.out(f"agent {agent_id} ready on {self.endpoints[agent_id]}")
        gateway_ready = self.workdir / "gateway.ready.json"
        gateway = await self._spawn("gateway", gateway_command(self.pool, self.redis_url, gateway_ready,
                                                               self.options.host, self.options.port), gateway_ready)
        info = await self._wait_ready(gateway, deadline)
        self.gateway_url = f"http://{self.options.host}:{info['port']}"

    async def serve(self, stop: asyncio.Event) -> int:
        """Start everything, print the URL, run the controller until stop is set or a child fails; then stop
        everything. Returns the exit status (0: stopped on request)."""
        try:
            await self.start()
            assert self.redis is not None
            async with PressureCollector(interval_ms=self.options.pressure_interval_ms,
                                         stale_after_s=self.options.stale_after_s) as collector:
                clients = AgentClients(self.options.rpc_timeout_s)
                try:
                    controller = self.controller(collector, clients)
                    await controller.publish()
                    collector.set_targets(self.endpoints)
                    if self.options.metrics_port is not None:
                        server, _thread = start_http_server(self.options.metrics_port, self.options.host,
                                                            self.metrics.registry)
                        self.out(f"metrics: http://{self.options.host}:{server.server_port}/metrics")
                    self.out(f"gateway: {self.gateway_url}  (OpenAI API at {self.gateway_url}/v1; Ctrl-C stops)")
                    self.serving.set()
                    return await self._supervise(stop, controller)
                finally:
                    await clients.close()
        except LocalModeError as exc:
            self.out(f"error: {exc}")
            return 1
        finally:
            await self.shutdown()

    def controller(self, collector: PressureCollector, clients: AgentClients) -> LocalController:
        assert self.redis is not None
        settings = ExecutorSettings(prepare_timeout_s=self.options.rpc_timeout_s,
                                    commit_timeout_s=self.options.commit_timeout_s,
                                    abort_timeout_s=self.options.rpc_timeout_s,
                                    status_timeout_s=self.options.rpc_timeout_s)
        self.ctl = LocalController(pool=self.pool, redis=self.redis, endpoints=dict(self.endpoints),
                                   cost=local_cost_model(self.pool), collector=collector,
                                   executor=Executor(clients, settings), out=self.out, gateway_url=self.gateway_url,
                                   scaler=self if self.pool.spec.autoscaling is not None else None,
                                   metrics=self.metrics)
        return self.ctl

    async def _supervise(self, stop: asyncio.Event, controller: LocalController) -> int:
        stopping = asyncio.ensure_future(stop.wait())
        loop = asyncio.ensure_future(controller.loop(self.options.plan_interval_s))
        try:
            while True:
                self.changed.clear()
                exits: dict[asyncio.Future[Any], Child] = {asyncio.ensure_future(c.proc.wait()): c
                                                           for c in self.children if not c.retired}
                starts: dict[asyncio.Future[Any], str] = {t: a for a, t in self.starting.items()}
                changed = asyncio.ensure_future(self.changed.wait())
                done, _ = await asyncio.wait({*exits, *starts, stopping, loop, changed},
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in (*exits, changed):
                    task.cancel()
                if stopping in done:
                    self.out("stopping")
                    return 0
                if loop in done:
                    loop.result()  # re-raise what stopped the controller
                    return 1
                failed = [t for t in done if t in starts and not t.cancelled() and t.exception() is not None]
                if failed:
                    self.out(f"scale-out of {starts[failed[0]]} failed: {failed[0].exception()}; stopping everything")
                    return 1
                child = next((exits[f] for f in done if f in exits and not exits[f].retired), None)
                if child is not None:
                    self.out(f"{child.name} exited with code {child.proc.returncode}; stopping everything. Its log "
                             f"({child.log_path}):\n{child.log_tail()}")
                    return 1
        finally:
            stopping.cancel()
            loop.cancel()
            for start in self.starting.values():
                start.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loop

    async def shutdown(self) -> None:
        """Stop every child in order (gateway, agents, redis): SIGTERM, then SIGKILL after STOP_GRACE_S."""
        if self.stopping:
            return
        self.stopping = True
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()
        order = [[c for c in self.children if c.name == "gateway"],
                 [c for c in self.children if c.name not in ("gateway", "redis")],
                 [c for c in self.children if c.name == "redis"]]
        for batch in order:
            await asyncio.gather(*(self._stop(c) for c in batch))

    async def _stop(self, child: Child) -> None:
        if child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                await child.proc.wait()


async def run_up(options: LocalOptions, out: Callable[[str], None] | None = None) -> int:
    """`kunserve up`: load the pool, serve it in the foreground until SIGINT / SIGTERM."""
    try:
        pool = load_pool(options.pool_file)
    except LocalModeError as exc:
        (out or print)(f"kunserve up: {exc}")
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await LocalPool(pool, options, out).serve(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def request_id() -> str:
    return uuid.uuid4().hex
