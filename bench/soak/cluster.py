"""The soak's processes and their supervisor: redis-server (append-only file, so a restart keeps the topology,
the journal and the records, as a Redis with a volume would), N agents, the controller process and one
gateway, each on a fixed port. The supervisor restarts whatever dies (as Kubernetes restarts a pod: same
name, same address, a fresh process) and samples every process's resident memory (VmRSS)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import redis

from kunserve.agent.launch import REPO, SOURCE_ROOTS, start_agent

KUNSERVE = "import sys; from kunserve.cli import main; sys.exit(main(sys.argv[1:]))"
POOL = "soak"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vm_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


@dataclass(slots=True)
class Pod:
    """One supervised process: how to start it, the running one, and its history."""

    name: str
    kind: str  # agent | redis | controller | gateway
    start: Callable[[], subprocess.Popen[bytes]]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    pids: list[int] = field(default_factory=list)
    rss: list[tuple[float, int, int]] = field(default_factory=list)  # (t, incarnation, KiB)
    down_since: float | None = None

    @property
    def incarnation(self) -> int:
        """How many times this pod was started: tells its processes apart (pids wrap and are reused)."""
        return len(self.pids)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self) -> None:
        self.proc = self.start()
        self.pids.append(self.proc.pid)
        self.down_since = None

    def kill(self) -> int | None:
        if not self.alive():
            return None
        assert self.proc is not None
        pid = self.proc.pid
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        return pid

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Cluster:
    def __init__(self, model: Path, workdir: Path, agents: int, agent_args: tuple[str, ...] = (),
                 restart_delay_s: float = 1.0, log: Callable[[str], None] = print) -> None:
        self.model, self.workdir, self.n = model, workdir, agents
        self.agent_args, self.restart_delay_s, self.log = agent_args, restart_delay_s, log
        self.redis_port = free_port()
        self.agent_ports = {f"{POOL}-agent-{i}": free_port() for i in range(agents)}
        self.gateway_port = free_port()
        self.pods: dict[str, Pod] = {}
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.events: list[tuple[float, str, str]] = []  # (t, pod, what)

    # ---- addresses ---------------------------------------------------------------------------------------
    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def endpoints(self) -> dict[str, str]:
        return {a: f"127.0.0.1:{p}" for a, p in self.agent_ports.items()}

    def redis_client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.redis_port, socket_timeout=5, socket_connect_timeout=2,
                           decode_responses=True)

    # ---- starting each kind --------------------------------------------------------------------------------
    def _popen(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), SOURCE_ROOTS])}
        with (self.workdir / f"{name}.log").open("ab") as out:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                    stdin=subprocess.DEVNULL)

    def _start_redis(self) -> subprocess.Popen[bytes]:
        proc = self._popen("redis", ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                     "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                                     "--dir", str(self.workdir)])
        client = self.redis_client()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                time.sleep(0.05)
        client.close()
        return proc

    def _start_agent(self, agent_id: str) -> subprocess.Popen[bytes]:
        log = self.workdir / agent_id / "agent.log"
        if log.exists():  # keep the log of the process that died (start_agent writes a new one)
            log.rename(log.with_name(f"agent.{self.pods[agent_id].restarts}.log"))
        agent = start_agent(self.model, self.workdir / agent_id, "--agent-id", agent_id, "--port",
                            str(self.agent_ports[agent_id]), "--metrics-port", "-1", *self.agent_args, timeout=120)
        return agent.proc

    def _start_controller(self) -> subprocess.Popen[bytes]:
        return self._popen("controller", [sys.executable, "-m", "bench.soak.controller", "--redis", self.redis_url,
                                          "--pool-file", str(self.pool_file), "--endpoints",
                                          json.dumps(self.endpoints)])

    def _start_gateway(self) -> subprocess.Popen[bytes]:
        ready = self.workdir / "gateway.ready.json"
        ready.unlink(missing_ok=True)
        proc = self._popen("gateway", [sys.executable, "-c", KUNSERVE, "gateway", "--model-dir", str(self.model),
                                       "--pool", POOL, "--redis", self.redis_url, "--port", str(self.gateway_port),
                                       "--ready-file", str(ready), "--max-replays", "6"])
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start: see {self.workdir / 'gateway.log'}")
            time.sleep(0.05)
        return proc

    @property
    def pool_file(self) -> Path:
        return self.workdir / "pool.yaml"

    def write_pool(self) -> None:
        doc = {"apiVersion": "kunserve.io/v1alpha1", "kind": "ServingPool", "metadata": {"name": POOL},
               "spec": {"model": {"name": self.model.name, "path": str(self.model), "dtype": "float32"},
                        "replicas": self.n, "elasticity": {"enabled": False, "maxGroupSize": self.n}}}
        self.pool_file.write_text(json.dumps(doc))

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_pool()
        self.pods["redis"] = Pod("redis", "redis", self._start_redis)
        for a in self.agent_ports:
            self.pods[a] = Pod(a, "agent", lambda a=a: self._start_agent(a))  # type: ignore[misc]
        self.pods["controller"] = Pod("controller", "controller", self._start_controller)
        self.pods["gateway"] = Pod("gateway", "gateway", self._start_gateway)
        self.pods["redis"].launch()
        with ThreadPoolExecutor(self.n) as pool:
            list(pool.map(lambda a: self.pods[a].launch(), list(self.agent_ports)))
        self.pods["controller"].launch()
        self.pods["gateway"].launch()
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._supervisor.start()

    def kill(self, name: str) -> int | None:
        """SIGKILL a pod's process (the supervisor restarts it)."""
        pid = self.pods[name].kill()
        self.events.append((time.time(), name, f"killed pid {pid}"))
        return pid

    def _supervise(self, interval_s: float = 0.2, rss_every_s: float = 2.0) -> None:
        last_rss = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            for pod in list(self.pods.values()):
                if pod.proc is not None and not pod.alive():
                    if pod.down_since is None:
                        pod.down_since = now
                    elif now - pod.down_since >= self.restart_delay_s and not self._stop.is_set():
                        try:
                            pod.launch()
                            pod.restarts += 1
                            self.events.append((time.time(), pod.name, f"restarted as pid {pod.pids[-1]}"))
                            self.log(f"supervisor: {pod.name} restarted (pid {pod.pids[-1]})")
                        except Exception as exc:  # a start that failed: try again next round
                            self.log(f"supervisor: {pod.name} did not start: {exc}")
                            pod.down_since = now
            if now - last_rss >= rss_every_s:
                last_rss = now
                for pod in self.pods.values():
                    if pod.alive():
                        assert pod.proc is not None
                        kib = vm_rss_kib(pod.proc.pid)
                        if kib is not None:
                            pod.rss.append((time.time(), pod.incarnation, kib))
            self._stop.wait(interval_s)

    def all_up(self) -> bool:
        return all(p.alive() for p in self.pods.values())

    def wait_all_up(self, timeout: float = 180.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.all_up():
                return True
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(10)
        for kind in ("gateway", "controller", "agent", "redis"):
            for pod in self.pods.values():
                if pod.kind == kind:
                    pod.stop()
