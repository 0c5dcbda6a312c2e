"""Start and stop a real `kunserve agent` process (tests, benchmarks and tools on one machine)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from kunserve.rpc.options import message_limits
from kunserve.rpc.tls import TlsFiles
from kunserve.rpc.tls import channel as tls_channel

REPO = Path(__file__).resolve().parents[3]  # a source checkout: agent/kunserve/agent/launch.py
SOURCE_ROOTS = ":".join(str(REPO / r) for r in ("operator", "agent", "gateway", "proto"))


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    agent_id: str
    grpc_port: int
    metrics_port: int
    log_path: Path
    tls: TlsFiles | None = None  # the agent serves TLS: this process's channels to it use the same files

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def channel(self) -> grpc.Channel:
        return tls_channel(self.target, self.tls, message_limits())

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_agent(model_dir: Path, workdir: Path, *extra: str, timeout: float = 60.0,
                tls: TlsFiles | None = None) -> AgentProcess:
    """Launch an agent with free ports and wait (bounded) until it reports ready. tls: serve (and call its
    peers) with these files."""
    if tls is not None:
        extra = (*extra, *tls_flags(tls))
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / "ready.json"
    ready.unlink(missing_ok=True)  # a ready file of an earlier run names stale ports
    log_path = workdir / "agent.log"
    cmd = [sys.executable, "-c", "import sys; from kunserve.cli import main; sys.exit(main(sys.argv[1:]))",
           "agent", "--model", str(model_dir), "--port", "0", "--metrics-port", "0", "--threads", "1",
           "--ready-file", str(ready), *extra]
    env = {**os.environ, "PYTHONPATH": SOURCE_ROOTS}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited with {proc.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"agent not ready after {timeout}s:\n{log_path.read_text()}")
        time.sleep(0.1)
    info = json.loads(ready.read_text())
    return AgentProcess(proc, info["agent_id"], info["grpc_port"], info["metrics_port"], log_path, tls)


def tls_flags(tls: TlsFiles) -> list[str]:
    flags = []
    for flag, value in (("--tls-cert", tls.cert), ("--tls-key", tls.key), ("--tls-ca", tls.ca),
                        ("--tls-server-name", tls.server_name)):
        if value is not None:
            flags += [flag, str(value)]
    return flags
