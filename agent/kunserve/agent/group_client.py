"""Drive real agent processes through drops and restores, and stream requests from them (tests, benchmarks).

Streams run on threads with the official gRPC client; reconfigurations use the Agent service exactly as
the operator does (Prepare on every member, Commit on the leader). The operator's executor is the full
version (recorded phases, idempotent resume, topology); this is the direct one tests and benchmarks use."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from prometheus_client.parser import text_string_to_metric_families

from kunserve.agent.launch import AgentProcess
from kunserve.rpc.v1 import agent_pb2, agent_pb2_grpc, inference_pb2, inference_pb2_grpc


def even_ranges(num_layers: int, g: int) -> list[tuple[int, int]]:
    base, extra = divmod(num_layers, g)
    out, start = [], 0
    for i in range(g):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


def group_spec(agents: list[AgentProcess], ranges: list[tuple[int, int]]) -> agent_pb2.GroupSpec:
    return agent_pb2.GroupSpec(stages=[
        agent_pb2.StageSpec(agent_id=a.agent_id, endpoint=a.target, layer_start=s, layer_end=e)
        for a, (s, e) in zip(agents, ranges, strict=True)
    ])


def reconfigure(agents: list[AgentProcess], action: int, ranges: list[tuple[int, int]], epoch: int,
                timeout: float = 60.0, reason: str = "manual",
                before_commit: Callable[[], None] | None = None) -> agent_pb2.CommitResponse:
    """Prepare on every member, then Commit on the leader (agents[0]); Abort everywhere on failure.
    before_commit runs once every member is prepared (a test puts work in flight at the commit point)."""
    spec = group_spec(agents, ranges)
    try:
        for a in agents:
            with a.channel() as ch:
                agent_pb2_grpc.AgentStub(ch).Prepare(
                    agent_pb2.PrepareRequest(epoch=epoch, action=action, group=spec, reason=reason),  # type: ignore[arg-type]
                    timeout=timeout)
        if before_commit is not None:
            before_commit()
        with agents[0].channel() as ch:
            return agent_pb2_grpc.AgentStub(ch).Commit(agent_pb2.CommitRequest(epoch=epoch), timeout=timeout)
    except Exception:
        for a in agents:
            try:
                with a.channel() as ch:
                    agent_pb2_grpc.AgentStub(ch).Abort(agent_pb2.AbortReconfigurationRequest(epoch=epoch), timeout=10)
            except grpc.RpcError:
                pass
        raise


def metric(agent: AgentProcess, name: str, **labels: str) -> float:
    """The sum of an agent's samples of `name` whose labels include `labels` (0 if it exports none)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=10).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def status(agent: AgentProcess) -> agent_pb2.StatusResponse:
    with agent.channel() as ch:
        return agent_pb2_grpc.AgentStub(ch).Status(agent_pb2.StatusRequest(), timeout=10)


@dataclass
class Stream:
    """One Generate stream consumed on a thread."""

    agent: AgentProcess
    request_id: str
    token_ids: list[int]
    params: inference_pb2.SamplingParams
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # time.monotonic() each token arrived
    text: str = ""
    finish_reason: int = 0
    error: grpc.RpcError | None = None
    done: threading.Event = field(default_factory=threading.Event)
    started: bool = False

    def start(self) -> Stream:
        self.started = True
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        try:
            with self.agent.channel() as ch:
                req = inference_pb2.GenerateRequest(request_id=self.request_id, sampling=self.params,
                                                    token_ids=inference_pb2.TokenIds(ids=self.token_ids))
                for msg in inference_pb2_grpc.InferenceStub(ch).Generate(req, timeout=300):
                    self.tokens.extend(msg.token_ids)
                    self.times.extend([time.monotonic()] * len(msg.token_ids))
                    self.text += msg.text
                    if msg.finish_reason:
                        self.finish_reason = msg.finish_reason
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.done.set()

    def wait(self, timeout: float = 300) -> Stream:
        assert self.done.wait(timeout), f"{self.request_id} did not finish in {timeout}s"
        return self


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.005) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(interval)
