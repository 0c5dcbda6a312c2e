"""A 2-way drop turns freed weights into KV capacity: with a budget that admits N concurrent requests on two
replicas (tiny preset, weights about half the budget), at least 1.6 x N run at once after the drop, and N
again after the restore. Concurrency is read from the agents' own pressure streams while a deep queue
keeps the pools full."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc

from kunserve.rpc.v1 import agent_pb2, agent_pb2_grpc, inference_pb2
from tests.integration.agent_process import AgentProcess, start_agent
from tests.integration.group_driver import Stream, even_ranges, reconfigure, status

BUDGET = "28000000"  # bytes: the tiny preset's weights are 51% of it
PROMPT, MAX_TOKENS = 50, 12  # 62 tokens: exactly 4 blocks of 16 for the request's whole life


class PeakRunning:
    """Largest num_running each agent reports while the context is open."""

    def __init__(self, agents: list[AgentProcess]) -> None:
        self.agents, self.peak = agents, {a.agent_id: 0 for a in agents}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch, args=(a,), daemon=True) for a in agents]

    def _watch(self, agent: AgentProcess) -> None:
        with agent.channel() as ch:
            call = agent_pb2_grpc.AgentStub(ch).WatchPressure(agent_pb2.WatchPressureRequest(interval_ms=10),
                                                              timeout=300)
            try:
                for p in call:
                    self.peak[agent.agent_id] = max(self.peak[agent.agent_id], p.num_running)
                    if self._stop.is_set():
                        call.cancel()
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.CANCELLED, exc

    def __enter__(self) -> PeakRunning:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


def _burst(agents: list[AgentProcess], n: int, tag: str) -> list[Stream]:
    params = inference_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    streams = [Stream(agents[i % len(agents)], f"{tag}{i}", [3 + (i * 7 + j) % 400 for j in range(PROMPT)], params)
               for i in range(n)]
    for s in streams:
        s.start()
    for s in streams:
        s.wait(240)
        assert s.error is None and len(s.tokens) == MAX_TOKENS, f"{s.request_id}: {s.error}"
    return streams


def test_two_way_drop_runs_at_least_1_6x_the_requests(tiny_dir: Path, tmp_path: Path) -> None:
    flags = ("--memory-budget", BUDGET, "--max-model-len", "128", "--max-num-batched-tokens", "256",
             "--max-num-seqs", "160")
    agents = [start_agent(tiny_dir, tmp_path / f"a{i}", "--agent-id", f"a{i}", *flags) for i in range(2)]
    try:
        blocks = [status(a).kv_blocks_total for a in agents]
        with PeakRunning(agents) as before:
            _burst(agents, 2 * sum(blocks) // 4, "before")
        n = sum(before.peak.values())
        # Each replica runs as many requests as its pool holds; chunked prefill may admit one more request
        # per replica for a moment on a partial prompt (it is preempted when it needs its fourth block).
        assert 0 <= n - sum(b // 4 for b in blocks) <= len(agents), f"{before.peak} with {blocks} blocks"

        layers = status(agents[0]).num_layers
        reconfigure(agents, agent_pb2.ACTION_DROP, even_ranges(layers, 2), epoch=1)
        with PeakRunning(agents) as during:
            _burst(agents, 3 * n, "during")
        grown = during.peak[agents[0].agent_id]  # the leader schedules the whole group
        assert grown >= 1.6 * n, f"{grown} concurrent after the drop, {n} before"

        reconfigure(agents, agent_pb2.ACTION_RESTORE, even_ranges(layers, 2), epoch=2)
        with PeakRunning(agents) as after:
            _burst(agents, 2 * n, "after")
        assert abs(sum(after.peak.values()) - n) <= len(agents), (after.peak, n)
        assert [status(a).kv_blocks_free for a in agents] == blocks
        print(f"concurrent requests: {n} before the drop, {grown} during ({grown / n:.2f}x), "
              f"{sum(after.peak.values())} after the restore")
    finally:
        for a in agents:
            a.stop()
