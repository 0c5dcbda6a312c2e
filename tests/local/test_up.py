"""`kunserve up`: a ServingPool on this machine — redis-server, two tiny agents, the gateway and the controller —
started from a YAML file, answering the official `openai` client, and stopped completely by SIGTERM."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.integration.agent_process import SOURCE_ROOTS

KUNSERVE = "import sys; from kunserve.cli import main; sys.exit(main(sys.argv[1:]))"
URL = re.compile(r"gateway: (http://127\.0\.0\.1:\d+)")
POOL = """\
apiVersion: kunserve.io/v1alpha1
kind: ServingPool
metadata:
  name: demo
spec:
  model:
    name: tiny
    path: {path}
  replicas: 2
  elasticity:
    maxGroupSize: 2
  engine:
    maxNumSeqs: 8
    maxModelLen: 512
    memoryBudgetBytes: 67108864
"""


class Up:
    """A `kunserve up` process whose output lines are collected by a thread."""

    def __init__(self, pool_file: Path, workdir: Path) -> None:
        cmd = [sys.executable, "-c", KUNSERVE, "up", "-f", str(pool_file), "--port", "0", "--threads", "1",
               "--workdir", str(workdir)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONPATH": SOURCE_ROOTS})
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for_line(self, pattern: re.Pattern[str], timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.output.append(line)
            if found := pattern.search(line):
                return found
        raise AssertionError(f"no line matching {pattern.pattern} after {timeout_s}s:\n{''.join(self.output)}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@pytest.fixture
def up(tiny_dir: Path, tmp_path: Path) -> Iterator[Up]:
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text(POOL.format(path=tiny_dir))
    process = Up(pool_file, tmp_path / "work")
    try:
        yield process
    finally:
        process.stop()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_serves_the_openai_api_and_sigterm_stops_everything(up: Up, tmp_path: Path) -> None:
    url = up.wait_for_line(URL, timeout_s=60).group(1)
    assert any("agent demo-agent-0 ready" in line for line in up.output)
    assert any("agent demo-agent-1 ready" in line for line in up.output)
    children = json.loads((tmp_path / "work" / "processes.json").read_text())
    assert set(children) == {"redis", "demo-agent-0", "demo-agent-1", "gateway"}
    assert all(alive(pid) for pid in children.values())

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=30, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    completion = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert completion.choices[0].finish_reason == "length" and completion.usage is not None
    assert completion.usage.completion_tokens == 8 and completion.choices[0].text

    status = subprocess.run(  # the running pool as `kunserve reconfigure status` sees it through its Redis
        [sys.executable, "-c", KUNSERVE, "reconfigure", "status", "--redis", redis_url(up), "--pool", "demo"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": SOURCE_ROOTS})
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert (state["gateway"], sorted(state["agents"]), state["epoch"]) == (url, ["demo-agent-0", "demo-agent-1"], 0)

    assert up.stop() == 0
    assert not [name for name, pid in children.items() if alive(pid)], "a child outlived kunserve up"


def redis_url(up: Up) -> str:
    found = next((m for line in up.output if (m := re.search(r"redis on (redis://\S+)", line))), None)
    assert found is not None, up.output
    return found.group(1)


def test_up_refuses_a_pool_it_cannot_serve(tmp_path: Path) -> None:
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text(POOL.format(path=tmp_path / "missing"))
    done = subprocess.run([sys.executable, "-c", KUNSERVE, "up", "-f", str(pool_file)], capture_output=True,
                          text=True, timeout=30, env={**os.environ, "PYTHONPATH": SOURCE_ROOTS})
    assert done.returncode == 2 and "has no config.json" in done.stdout
