"""Burst benchmark: one BurstGPT-shaped workload under KunServe and the KV-centric baselines, same engine,
same machine, one run.

For each policy (bench/policies.py) it starts `--agents` fresh agent processes, calibrates prefill time on an
idle agent, replays the workload (bench/workload.py) over gRPC streams with the same routing (least open
requests), samples every agent's /metrics, and reports TTFT / TPOT p50-p90-p99, estimated queue time, SLO
attainment, throughput, the burst's P99 TTFT and the ratios against `kunserve`. Writes JSON + PNG
(bench/burst_report.py). Asserts no timing.

    python -m bench.burst --model .models/smollm2-135m                # every policy, default workload
    python -m bench.burst --model .models/tiny --policies vllm kunserve --calm 2 --burst 3 --after 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.burst_report import plot, policy_summary, print_table, ratios
from bench.policies import ControlEvent, Controller, Placement, Policy
from bench.probe import AgentSample, sample
from bench.workload import BurstShape, Lengths, Phase, WorkItem, generate, prompt_ids, summary
from kunserve.agent.launch import AgentProcess, start_agent
from kunserve.operator.plan_types import PoolSpec
from kunserve.rpc.options import message_limits
from kunserve.rpc.v1 import inference_pb2, inference_pb2_grpc


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    phase: str
    arrival_s: float  # scheduled, seconds after the workload started
    prompt_len: int
    output_len: int
    agent: str = ""
    token_times: list[float] = field(default_factory=list)  # seconds after the workload started
    retries: int = 0
    error: str = ""

    @property
    def finished(self) -> bool:
        return not self.error and len(self.token_times) == self.output_len

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


@dataclass(slots=True)
class PolicyRun:
    policy: Policy
    records: list[RequestRecord]
    events: list[ControlEvent]
    timeline: list[AgentSample]
    prefill_fit: tuple[float, float]  # seconds = a + b * prompt tokens, measured idle
    counters: dict[str, float]
    wall_s: float


class Runner:
    def __init__(self, args: argparse.Namespace, policy: Policy, items: list[WorkItem], workdir: Path) -> None:
        self.args, self.policy, self.items, self.workdir = args, policy, items, workdir
        self.agents: dict[str, AgentProcess] = {}
        self.open: dict[str, int] = {}
        self.placement = Placement()
        self.t0 = time.monotonic()
        self.vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def start_agents(self) -> None:
        a = self.args
        flags = ["--model-name", "bench", "--num-kv-blocks", str(a.kv_blocks), "--block-size", str(a.block_size),
                 "--max-num-seqs", str(a.max_num_seqs), "--max-num-batched-tokens", str(a.max_batched_tokens),
                 "--threads", str(a.threads), "--max-model-len", str(a.max_model_len), "--log-level", "WARNING",
                 *self.policy.agent_flags(a.swap_bandwidth)]
        ids = [f"a{i}" for i in range(a.agents)]
        procs = await asyncio.gather(*(asyncio.to_thread(start_agent, a.model, self.workdir / f"{self.policy}-{i}",
                                                         "--agent-id", i, *flags, timeout=300.0) for i in ids))
        self.agents = dict(zip(ids, procs, strict=True))
        self.open = dict.fromkeys(ids, 0)
        self.channels = {i: grpc.aio.insecure_channel(p.target, options=message_limits())
                         for i, p in self.agents.items()}

    def stop_agents(self) -> None:
        for p in self.agents.values():
            p.stop()

    async def _generate(self, agent: str, rid: str, ids: list[int], max_tokens: int, offset: int,
                        on_tokens: Callable[[list[int]], None]) -> None:
        params = inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                              sample_index_offset=offset)
        req = inference_pb2.GenerateRequest(request_id=rid, sampling=params, token_ids=inference_pb2.TokenIds(ids=ids))
        async for msg in inference_pb2_grpc.InferenceStub(self.channels[agent]).Generate(req, timeout=900):
            if msg.token_ids:
                on_tokens(list(msg.token_ids))

    def _pick(self) -> str:
        return min(self.open, key=lambda a: (self.open[a], a))

    async def calibrate(self) -> tuple[float, float]:
        """Prefill seconds = a + b x prompt tokens on an idle agent (TTFT of max_tokens=1 requests)."""
        lens = [self.args.prompt_min, self.args.prompt_median, min(self.args.prompt_max, 4 * self.args.prompt_median)]
        xs, ys = [], []
        for k, n in enumerate([lens[1], *lens]):  # the first one warms up
            ids = prompt_ids(WorkItem(f"cal{k}", 0, n, 1, Phase.CALM), -1, self.vocab)
            t = time.monotonic()
            await self._generate("a0", f"cal{k}", ids, 1, 0, lambda _toks: None)
            if k:
                xs.append(float(n))
                ys.append(time.monotonic() - t)
        slope, intercept = statistics.linear_regression(xs, ys)
        return max(intercept, 0.0), max(slope, 0.0)

    async def one(self, item: WorkItem, rec: RequestRecord) -> None:
        await asyncio.sleep(max(0.0, item.arrival_s - self.now()))
        prompt = prompt_ids(item, self.args.seed, self.vocab)
        got: list[int] = []
        rid = item.request_id

        def on_tokens(toks: list[int]) -> None:
            got.extend(toks)
            rec.token_times.extend([self.now()] * len(toks))
            self.placement.tokens[rid] = len(got)

        while len(got) < item.output_len and not rec.error:
            agent = self._pick()
            rec.agent = rec.agent or agent
            rid = f"{item.request_id}.{rec.retries}" if rec.retries else item.request_id
            self.open[agent] += 1
            self.placement.location[rid], self.placement.arrival[rid] = agent, item.arrival_s
            self.placement.tokens[rid] = len(got)
            try:  # a retry replays prompt + tokens so far, like the gateway's token replay
                await self._generate(agent, rid, prompt + got, item.output_len - len(got), len(got), on_tokens)
            except grpc.aio.AioRpcError as exc:
                rec.error = f"{exc.code().name}: {exc.details()}"
                await asyncio.sleep(0.2)
            finally:
                self.open[agent] -= 1
                self.placement.location.pop(rid, None)
            if len(got) < item.output_len:
                rec.retries += 1
                rec.error = rec.error if rec.retries > 20 else ""

    async def sampler(self, stop: asyncio.Event, out: list[AgentSample]) -> None:
        while not stop.is_set():
            t = self.now()
            for aid, p in self.agents.items():
                with contextlib.suppress(OSError):
                    out.append(await asyncio.to_thread(sample, f"127.0.0.1:{p.metrics_port}", aid, t))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.args.sample_seconds)

    async def run(self) -> PolicyRun:
        await self.start_agents()
        try:
            fit = await self.calibrate()
            a = self.args
            planner = PoolSpec(drop_demand=a.drop_demand, restore_demand=a.restore_demand,
                               restore_window_s=a.restore_window, max_group_size=a.group_size)
            self.t0 = time.monotonic()
            ctl = Controller(self.policy, {i: p.target for i, p in self.agents.items()}, a.model, a.block_size,
                             planner, self.placement, self.now)
            records = [RequestRecord(i.request_id, i.phase.value, i.arrival_s, i.prompt_len, i.output_len)
                       for i in self.items]
            stop, timeline = asyncio.Event(), list[AgentSample]()
            background = [asyncio.ensure_future(ctl.run(stop)), asyncio.ensure_future(self.sampler(stop, timeline))]
            await asyncio.gather(*(self.one(i, r) for i, r in zip(self.items, records, strict=True)))
            wall = self.now()
            if self.policy is Policy.KUNSERVE and ctl.groups:  # let the planner restore before the agents stop
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._until(lambda: not ctl.groups), a.restore_window + 30)
            stop.set()
            await asyncio.gather(*background)
            counters = {k: float(sum(v)) for k, v in (await self._counters()).items()}
            return PolicyRun(self.policy, records, ctl.events, timeline, fit, counters, wall)
        finally:
            for ch in getattr(self, "channels", {}).values():
                await ch.close()
            await asyncio.to_thread(self.stop_agents)

    async def _until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await asyncio.sleep(0.2)

    async def _counters(self) -> dict[str, list[float]]:
        from bench.probe import scrape

        out: dict[str, list[float]] = {}
        for p in self.agents.values():
            with contextlib.suppress(OSError):
                for k, v in (await asyncio.to_thread(scrape, f"127.0.0.1:{p.metrics_port}")).items():
                    if k.endswith("_total"):
                        out.setdefault(k, []).append(v)
        return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--policies", nargs="+", type=Policy, default=list(Policy))
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per agent")
    ap.add_argument("--kv-blocks", type=int, default=48, help="KV blocks per agent holding every layer")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-batched-tokens", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calm", type=float, default=10.0, help="seconds of calm before the burst")
    ap.add_argument("--burst", type=float, default=15.0)
    ap.add_argument("--after", type=float, default=20.0, help="seconds of calm after the burst")
    ap.add_argument("--rate", type=float, default=0.5, help="calm arrival rate, requests/s")
    ap.add_argument("--peak-factor", type=float, default=8.0)
    ap.add_argument("--cv", type=float, default=2.0, help="inter-arrival CV in the burst")
    ap.add_argument("--prompt-median", type=int, default=160)
    ap.add_argument("--prompt-min", type=int, default=8)
    ap.add_argument("--prompt-max", type=int, default=512)
    ap.add_argument("--output-median", type=int, default=48)
    ap.add_argument("--output-max", type=int, default=192)
    ap.add_argument("--slo-ttft", type=float, default=5.0, help="TTFT SLO, seconds")
    ap.add_argument("--slo-tpot", type=float, default=0.5, help="TPOT SLO, seconds")
    ap.add_argument("--swap-bandwidth", type=float, default=16e9, help="modelled PCIe bytes/s of the swap policy")
    ap.add_argument("--drop-demand", type=float, default=0.9)
    ap.add_argument("--restore-demand", type=float, default=0.5)
    ap.add_argument("--restore-window", type=float, default=5.0)
    ap.add_argument("--group-size", type=int, default=4, help="largest group the planner forms")
    ap.add_argument("--sample-seconds", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=Path("bench/results/burst.json"))
    ap.add_argument("--no-plot", action="store_true")
    return ap.parse_args(argv)


def workload(args: argparse.Namespace) -> list[WorkItem]:
    shape = BurstShape(args.calm, args.burst, args.after, args.rate, args.peak_factor, args.cv)
    lengths = Lengths(prompt_median=args.prompt_median, prompt_min=args.prompt_min, prompt_max=args.prompt_max,
                      output_median=args.output_median, output_max=args.output_max)
    return generate(shape, lengths, args.seed)


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    items = workload(args)
    print(f"workload: {summary(items)}", flush=True)
    runs: list[PolicyRun] = []
    with tempfile.TemporaryDirectory(prefix="kunserve-burst-") as tmp:
        for policy in args.policies:
            print(f"{policy}: starting {args.agents} agents ...", flush=True)
            run = await Runner(args, policy, items, Path(tmp)).run()
            done = sum(r.finished for r in run.records)
            print(f"{policy}: {done}/{len(run.records)} finished in {run.wall_s:.1f} s, "
                  f"{len(run.events)} control events", flush=True)
            runs.append(run)
    summaries = {r.policy.value: policy_summary(r, args) for r in runs}
    rel = ratios(summaries)
    report: dict[str, Any] = {
        "command": "python -m bench.burst " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                      if k not in ("policies", "no_plot")),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": __import__("os").cpu_count()},
        "config": {k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if k == "policies" else v)
                   for k, v in vars(args).items()},
        "workload": summary(items),
        "policies": summaries,
        "ratios_vs_kunserve": rel,
        "runs": {r.policy.value: {"events": [asdict(e) for e in r.events], "prefill_fit": r.prefill_fit,
                                  "counters": r.counters, "requests": [asdict(x) for x in r.records],
                                  "timeline": [asdict(s) for s in r.timeline]} for r in runs},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print_table(summaries, rel)
    if not args.no_plot:
        png = args.out.with_suffix(".png")
        plot(runs, png, args)
        print(f"wrote {args.out} and {png}")
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return asyncio.run(run_all(parse_args(argv)))


if __name__ == "__main__":
    main()
