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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from redis.asyncio import Redis
from redis.exceptions import RedisError

from kunserve.operator.agent_client import AgentClients
from kunserve.operator.controller import decide, next_epoch, replica_names
from kunserve.operator.cost_model import CostModel, even_split
from kunserve.operator.executor import Executor, ExecutorSettings, OutcomeUnknownError
from kunserve.operator.plan_types import StagePlan
from kunserve.operator.planner import group_id_for
from kunserve.operator.pool_spec import Dtype, InvalidServingPool, ServingPool
from kunserve.operator.pressure import PressureCollector
from kunserve.operator.reconfig import (
    Action,
    FormedGroup,
    GroupChange,
    InvalidReconfiguration,
    ReconfigRecord,
    ReconfigSpec,
    ReconfigurationLog,
    apply_committed,
    check_drop,
    reconfiguration_name,
    resolve_restore,
)
from kunserve.operator.topology_writer import ReplicaEndpoint, build_topology, write_topology
from kunserve.operator.validation import parse_pool

log = logging.getLogger("kunserve.local")
KUNSERVE = "import sys; from kunserve.cli import main; sys.exit(main(sys.argv[1:]))"
DTYPE_BYTES = {Dtype.FLOAT32: 4, Dtype.BFLOAT16: 2, Dtype.FLOAT16: 2}
STOP_GRACE_S = 10.0
REPLY_TTL_S = 300


class LocalModeError(RuntimeError):
    """Local mode cannot start or had to stop (the message says why)."""


def records_key(pool: str) -> str:
    return f"kunserve:reconfigurations:{pool}"


def requests_key(pool: str) -> str:
    return f"kunserve:reconfigure:{pool}:requests"


def reply_key(pool: str, request_id: str) -> str:
    return f"kunserve:reconfigure:{pool}:reply:{request_id}"


def state_key(pool: str) -> str:
    return f"kunserve:local:{pool}"


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

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# ----------------------------------------------------------------------------------------------- the controller


@dataclass(slots=True)
class RedisRecordStore:
    """Saves a reconfiguration's record (with its spec) in the pool's hash of reconfigurations."""

    redis: Redis
    pool: str
    name: str
    spec: ReconfigSpec
    last: ReconfigRecord = field(default_factory=ReconfigRecord)

    async def save(self, record: ReconfigRecord) -> None:
        self.last = record.copy()
        await self.redis.hset(records_key(self.pool), self.name,
                              ReconfigurationLog(self.name, self.spec, record).to_json())


@dataclass(slots=True)
class LocalController:
    """collector → planner → executor, one reconfiguration at a time, plus manual requests from Redis."""

    pool: ServingPool
    redis: Redis
    endpoints: dict[str, str]  # agent id -> host:port
    cost: CostModel
    collector: PressureCollector
    executor: Executor
    out: Callable[[str], None] = print
    clock: Callable[[], float] = time.time
    epoch: int = 0
    allocated: int = 0  # the highest epoch handed out (a failed reconfiguration's epoch is not reused)
    groups: tuple[FormedGroup, ...] = ()
    low_since: dict[str, float] = field(default_factory=dict)
    history: list[ReconfigurationLog] = field(default_factory=list)
    gateway_url: str = ""

    @property
    def name(self) -> str:
        return self.pool.ref.name

    def topology(self) -> dict[str, Any]:
        replicas = [ReplicaEndpoint(a, e) for a, e in self.endpoints.items()]
        return build_topology(epoch=self.epoch, model=self.pool.spec.model.name, replicas=replicas,
                              groups=self.groups, num_layers=self.cost.num_layers, updated_at=self.clock())

    async def publish(self) -> None:
        """The topology, then the description of the running pool."""
        await write_topology(self.redis, self.name, self.topology())
        state = {"pool": self.name, "model": self.pool.spec.model.name, "gateway": self.gateway_url,
                 "agents": self.endpoints, "epoch": self.epoch, "groups": [g.to_status() for g in self.groups],
                 "pid": os.getpid()}
        await self.redis.set(state_key(self.name), json.dumps(state, separators=(",", ":")))

    async def step(self) -> ReconfigurationLog | None:
        """One round: a manual request if one waits, else the planner's decision (if elasticity is on)."""
        raw = await self.redis.lpop(requests_key(self.name))
        if isinstance(raw, str | bytes):
            return await self.manual(raw)
        if not self.pool.spec.elasticity.enabled:
            return None
        pressures = self.collector.snapshot()
        if not pressures:
            return None
        decision, self.low_since = decide(pressures, self.groups, model=self.pool.spec.model.name,
                                          spec=self.pool.spec.elasticity.to_planner(), cost=self.cost,
                                          now=self.clock(), low_since=self.low_since)
        if decision is None:
            return None
        self.low_since.pop(decision.group.id, None)
        return await self.run(decision.spec(self.name, self.take_epoch()))

    def take_epoch(self, wanted: int | None = None) -> int:
        epoch = wanted if wanted is not None else next_epoch(self.epoch, [self.allocated])
        self.allocated = max(self.allocated, epoch)
        return epoch

    async def run(self, spec: ReconfigSpec) -> ReconfigurationLog:
        name = reconfiguration_name(self.name, spec.action, spec.epoch)
        store = RedisRecordStore(self.redis, self.name, name, spec)
        record = ReconfigRecord()
        await store.save(record)
        while True:
            try:
                record = await self.executor.execute(
                    spec, {m: self.endpoints[m] for m in spec.members if m in self.endpoints}, record=record,
                    store=store, on_committed=lambda s, r: self._committed(name, s, r), current_epoch=self.epoch,
                    num_layers=self.cost.num_layers)
                break
            except OutcomeUnknownError as exc:  # a leader does not answer: ask again later, never guess
                self.out(f"reconfiguration {name}: {exc}; retrying")
                record = store.last
                await asyncio.sleep(1.0)
        entry = ReconfigurationLog(name, spec, record)
        self.history.append(entry)
        self.out(f"reconfiguration {entry.summary()}")
        return entry

    async def _committed(self, name: str, spec: ReconfigSpec, record: ReconfigRecord) -> None:
        self.groups = apply_committed(self.groups, spec, record.committed_groups, name)
        self.epoch = max(self.epoch, spec.epoch)
        await self.publish()

    async def manual(self, raw: str | bytes) -> ReconfigurationLog | None:
        """A request from `kunserve reconfigure`: run it, answer on its reply key."""
        request_id = ""
        try:
            request = json.loads(raw)
            request_id = str(request.get("id") or "")
            spec = self.manual_spec(request)
        except (ValueError, TypeError, KeyError, InvalidReconfiguration) as exc:
            await self._reply(request_id, {"error": str(exc)})
            self.out(f"manual reconfiguration refused: {exc}")
            return None
        entry = await self.run(spec)
        await self._reply(request_id, json.loads(entry.to_json()))
        return entry

    def manual_spec(self, request: Mapping[str, Any]) -> ReconfigSpec:
        action = Action(str(request.get("action")))
        reason = str(request.get("reason") or f"manual {action.value.lower()}")
        epoch = request.get("epoch")
        if epoch is not None and (not isinstance(epoch, int) or epoch <= self.allocated):
            raise InvalidReconfiguration([f"epoch {epoch} is not newer than {self.allocated}"])
        members = tuple(str(m) for m in request.get("members") or ())
        if action is Action.DROP:
            if len(members) < 2:
                raise InvalidReconfiguration(["a drop needs at least 2 members"])
            ranges = request.get("ranges") or even_split(self.cost.num_layers, len(members))
            stages = tuple(StagePlan(m, int(a), int(b)) for m, (a, b) in zip(members, ranges, strict=True))
            group = GroupChange(str(request.get("group") or group_id_for(members)), members, stages)
        else:
            wanted = request.get("group")
            found = next((g for g in self.groups if g.id == wanted or (members and set(members) <= set(g.members))),
                         None)
            if wanted is None and not members and len(self.groups) == 1:
                found = self.groups[0]  # the only group there is
            if found is None:
                raise InvalidReconfiguration([f"no formed group matches {wanted or list(members)} "
                                              f"(formed: {[g.id for g in self.groups] or 'none'})"])
            group = GroupChange(found.id, found.members, found.stages)
        spec = ReconfigSpec(pool=self.name, epoch=0, action=action, groups=(group,), reason=reason, manual=True)
        problems = spec.problems(self.cost.num_layers)
        if problems:
            raise InvalidReconfiguration(problems)
        spec = resolve_restore(spec, self.groups)
        check_drop(spec, list(self.endpoints), self.groups)
        return ReconfigSpec(pool=spec.pool, epoch=self.take_epoch(epoch), action=action, groups=spec.groups,
                            reason=reason, manual=True)

    async def _reply(self, request_id: str, payload: Mapping[str, Any]) -> None:
        if request_id:
            key = reply_key(self.name, request_id)
            await self.redis.rpush(key, json.dumps(payload))
            await self.redis.expire(key, REPLY_TTL_S)

    async def loop(self, interval_s: float) -> None:
        """Rounds until cancelled; a failed round is reported and the loop goes on."""
        while True:
            try:
                await self.step()
            except (RedisError, OSError) as exc:
                self.out(f"controller round failed: {type(exc).__name__}: {exc}")
            await asyncio.sleep(interval_s)


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

    @property
    def name(self) -> str:
        return self.pool.ref.name

    async def _spawn(self, name: str, cmd: list[str], ready_file: Path | None = None) -> Child:
        log_path = self.workdir / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": source_path()}
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=asyncio.subprocess.STDOUT, env=env,
                start_new_session=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
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
        ids = replica_names(self.name, spec.replicas)
        threads = self.options.threads or max(1, (os.cpu_count() or 1) // spec.replicas)
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
                    self.out(f"gateway: {self.gateway_url}  (OpenAI API at {self.gateway_url}/v1; Ctrl-C stops)")
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
        return LocalController(pool=self.pool, redis=self.redis, endpoints=dict(self.endpoints),
                               cost=local_cost_model(self.pool), collector=collector,
                               executor=Executor(clients, settings), out=self.out, gateway_url=self.gateway_url)

    async def _supervise(self, stop: asyncio.Event, controller: LocalController) -> int:
        exits: dict[asyncio.Future[Any], Child] = {asyncio.ensure_future(c.proc.wait()): c for c in self.children}
        stopping = asyncio.ensure_future(stop.wait())
        loop = asyncio.ensure_future(controller.loop(self.options.plan_interval_s))
        try:
            done, _ = await asyncio.wait({*exits, stopping, loop}, return_when=asyncio.FIRST_COMPLETED)
            if stopping in done:
                self.out("stopping")
                return 0
            if loop in done:
                loop.result()  # re-raise what stopped the controller
                return 1
            child = next(exits[f] for f in done if f in exits)
            self.out(f"{child.name} exited with code {child.proc.returncode}; stopping everything. Its log "
                     f"({child.log_path}):\n{child.log_tail()}")
            return 1
        finally:
            for task in (*exits, stopping, loop):
                task.cancel()
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
