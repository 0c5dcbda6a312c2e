"""Real processes for gateway tests: redis-server, `kunserve gateway`, and small HTTP helpers.

Every wait is bounded in time; every process is stopped by its own pid.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tests.integration.agent_process import SOURCE_ROOTS, AgentProcess, start_agent

T = TypeVar("T")
KUNSERVE = "import sys; from kunserve.cli import main; sys.exit(main(sys.argv[1:]))"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], T], timeout: float = 20.0, interval: float = 0.05, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true after {timeout}s: {what or predicate}")
        time.sleep(interval)


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


@dataclass
class RedisProcess:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, decode_responses=True)

    def stop(self) -> int:
        return _stop(self.proc)


def start_redis(workdir: Path, timeout: float = 10.0, port: int | None = None) -> RedisProcess:
    """A redis-server on a free loopback port (or `port`: a restart where clients expect it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = (workdir / "redis.log").open("wb")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)], stdout=log, stderr=subprocess.STDOUT)
    server = RedisProcess(proc, port)
    client = server.client()

    def ping() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        try:
            return bool(client.ping())
        except Exception:
            return False

    wait_until(ping, timeout, 0.05, "redis-server answers PING")
    return server


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        return _stop(self.proc)


def start_gateway(model_dir: Path, workdir: Path, *args: str, env: dict[str, str] | None = None,
                  timeout: float = 30.0) -> GatewayProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / "gateway-ready.json"
    ready.unlink(missing_ok=True)
    log_path = workdir / "gateway.log"
    cmd = [sys.executable, "-c", KUNSERVE, "gateway", "--model-dir", str(model_dir), "--port", "0",
           "--ready-file", str(ready), *args]
    full_env = {**os.environ, "PYTHONPATH": SOURCE_ROOTS}
    full_env.pop("KUNSERVE_API_KEYS", None)  # only what the test gives
    full_env.update(env or {})
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)

    def is_ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{log_path.read_text()}")
        return ready.exists()

    wait_until(is_ready, timeout, 0.05, "gateway ready file")
    return GatewayProcess(proc, json.loads(ready.read_text())["port"], log_path)


def start_agents(model_dir: Path, workdir: Path, specs: list[tuple[str, tuple[str, ...]]]) -> list[AgentProcess]:
    """Start agents concurrently: specs = [(agent_id, extra args)]."""
    def one(spec: tuple[str, tuple[str, ...]]) -> AgentProcess:
        agent_id, extra = spec
        return start_agent(model_dir, workdir / agent_id, "--agent-id", agent_id, *extra)

    with ThreadPoolExecutor(len(specs)) as pool:
        return list(pool.map(one, specs))


def request(base_url: str, method: str, path: str, body: bytes | dict[str, Any] | None = None,
            headers: dict[str, str] | None = None, timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with http.client (raw bodies allowed); returns (status, headers, body)."""
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {"content-type": "application/json", **(headers or {})}
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def sse_events(raw: bytes) -> Iterator[dict[str, Any] | str]:
    """Parse an SSE body: each `data:` payload as JSON, or the string "[DONE]"."""
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            payload = block.removeprefix("data: ")
            yield payload if payload == "[DONE]" else json.loads(payload)


def prometheus_value(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of `name` whose label set contains `labels` (e.g. 'reason="unavailable"')."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {") and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
