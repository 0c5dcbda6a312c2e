"""`make demo`: serve a 4-agent ServingPool with `kunserve up`, send a burst through the gateway with the official
`openai` client, and watch KunServe drop layers to absorb it and restore them afterwards.

It prints live progress (requests done, TTFT so far, layers held / KV used per agent, the epoch), then a table
(TTFT and TPOT p50/p99, throughput, reconfigurations) and writes a PNG (KV usage and layers held per agent over
time with the drops and restores, and TTFT over time). Every process it started stops at the end, on an error
and on Ctrl-C. This process never imports torch.

    python -m bench.demo --model .models/smollm2-135m
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.burst_report import pct
from bench.probe import AgentSample, sample
from bench.workload import BurstShape, Lengths, WorkItem, generate, prompt_ids

HERE = Path(__file__).resolve().parent


@dataclass(slots=True)
class Reconf:
    t: float
    line: str

    @property
    def kind(self) -> str:
        return "drop" if " Drop " in self.line else "restore" if " Restore " in self.line else "other"


@dataclass(slots=True)
class Up:
    """`kunserve up` in its own session; its output lines are kept with their times."""

    proc: subprocess.Popen[str]
    t0: float
    lines: list[tuple[float, str]] = field(default_factory=list)
    reconfs: list[Reconf] = field(default_factory=list)

    def follow(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            t = time.monotonic() - self.t0
            line = line.rstrip()
            self.lines.append((t, line))
            if "reconfiguration " in line:
                self.reconfs.append(Reconf(t, line))
                print(f"  >> {line.removeprefix('kunserve up: ')}", flush=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # it stops the gateway, the agents and Redis in order
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def start_up(args: argparse.Namespace, workdir: Path) -> Up:
    pool = yaml.safe_load(args.pool.read_text())
    pool["spec"]["model"]["path"] = str(args.model.resolve())
    pool_file = workdir / "pool.yaml"
    pool_file.write_text(yaml.safe_dump(pool))
    cmd = [sys.executable, "-c", "import sys; from kunserve.cli import main; sys.exit(main(sys.argv[1:]))", "up",
           "-f", str(pool_file), "--port", "0", "--threads", str(args.threads), "--workdir", str(workdir / "up"),
           "--plan-seconds", "0.5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    up = Up(proc, time.monotonic())
    threading.Thread(target=up.follow, daemon=True).start()
    return up


def wait_gateway(up: Up, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, line in up.lines:
            m = re.search(r"gateway: (http://\S+)", line)
            if m:
                return m.group(1)
        if up.proc.poll() is not None:
            raise RuntimeError("kunserve up exited:\n" + "\n".join(line for _, line in up.lines[-30:]))
        time.sleep(0.2)
    raise TimeoutError("the pool did not start in time")


@dataclass(slots=True)
class Req:
    item: WorkItem
    times: list[float] = field(default_factory=list)
    error: str = ""


async def send(client: object, model: str, r: Req, t0: float, vocab: int, seed: int) -> None:
    from openai import AsyncOpenAI, OpenAIError

    assert isinstance(client, AsyncOpenAI)
    await asyncio.sleep(max(0.0, r.item.arrival_s - (time.monotonic() - t0)))
    try:
        stream = await client.completions.create(model=model, prompt=prompt_ids(r.item, seed, vocab),
                                                 max_tokens=r.item.output_len, temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                r.times.append(time.monotonic() - t0)
    except OpenAIError as exc:
        r.error = f"{type(exc).__name__}: {exc}"


def agents_of(workdir: Path) -> dict[str, str]:
    """agent id -> host:port of its /metrics, from the ready files `kunserve up` keeps in its workdir."""
    out = {}
    for f in sorted((workdir / "up").glob("*-agent-*.ready.json")):
        info = json.loads(f.read_text())
        out[info["agent_id"]] = f"127.0.0.1:{info['metrics_port']}"
    return out


async def watch(reqs: list[Req], agents: dict[str, str], t0: float, timeline: list[AgentSample],
                stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.monotonic() - t0
        snap = []
        for aid, hp in agents.items():
            with contextlib.suppress(OSError):
                s = await asyncio.to_thread(sample, hp, aid, t)
                timeline.append(s)
                snap.append(s)
        ttft = [r.times[0] - r.item.arrival_s for r in reqs if r.times]
        done = sum(len(r.times) >= r.item.output_len or bool(r.error) for r in reqs)
        arrived = sum(r.item.arrival_s <= t for r in reqs)
        layers = " ".join(f"{s.agent.rsplit('-', 1)[-1]}:{s.layers_held:>2}L/{s.kv_usage:4.0%}" for s in snap)
        epoch = max((s.epoch for s in snap), default=0)
        p50, p99 = (f"{pct(ttft, q):5.2f}s" if ttft else "    -" for q in (50, 99))
        print(f"[{t:5.1f}s] arrived {arrived:>3}/{len(reqs)} done {done:>3}  TTFT p50 {p50} p99 {p99}  "
              f"agents(layers/KV) {layers}  epoch {epoch}", flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def burst(args: argparse.Namespace, url: str, workdir: Path) -> tuple[list[Req], list[AgentSample], float,
                                                                           float]:
    """The requests, the agents' samples, when the last request ended, and when the burst started (monotonic)."""
    from openai import AsyncOpenAI

    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    items = generate(BurstShape(args.calm, args.burst, args.after, args.rate, args.peak_factor, args.cv),
                     Lengths(prompt_median=args.prompt_median, prompt_max=4 * args.prompt_median,
                             output_median=args.output_median, output_max=3 * args.output_median), args.seed)
    reqs = [Req(i) for i in items]
    print(f"burst: {len(reqs)} requests over {args.calm + args.burst + args.after:.0f} s ({args.rate}/s calm, "
          f"x{args.peak_factor} for {args.burst:.0f} s), streamed through {url}/v1", flush=True)
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="demo", max_retries=8, timeout=600)
    model = (await client.models.list()).data[0].id
    t0 = time.monotonic()
    timeline: list[AgentSample] = []
    stop = asyncio.Event()
    watcher = asyncio.ensure_future(watch(reqs, agents_of(workdir), t0, timeline, stop))
    await asyncio.gather(*(send(client, model, r, t0, vocab, args.seed) for r in reqs))
    end = time.monotonic() - t0
    deadline = time.monotonic() + args.restore_wait
    while time.monotonic() < deadline and any(s.layers_held < max(x.layers_held for x in timeline)
                                              for s in timeline[-len(agents_of(workdir)):]):
        await asyncio.sleep(0.5)  # show the restore
    stop.set()
    await watcher
    await client.close()
    return reqs, timeline, end, t0


def report(reqs: list[Req], timeline: list[AgentSample], end: float, reconfs: list[Reconf], png: Path) -> None:
    ok = [r for r in reqs if r.times and not r.error]
    ttft = [r.times[0] - r.item.arrival_s for r in ok]
    tpot = [(r.times[-1] - r.times[0]) / (len(r.times) - 1) for r in ok if len(r.times) > 1]
    burst = [r.times[0] - r.item.arrival_s for r in ok if r.item.phase.value == "burst"]
    tokens = sum(len(r.times) for r in reqs)
    drops = sum(r.kind == "drop" for r in reconfs)
    restores = sum(r.kind == "restore" for r in reconfs)
    rows = [("requests finished", f"{len(ok)} / {len(reqs)}"),
            ("TTFT p50 / p99", f"{pct(ttft, 50):.2f} s / {pct(ttft, 99):.2f} s"),
            ("TTFT p99 of burst arrivals", f"{pct(burst, 99):.2f} s"),
            ("TPOT p50 / p99", f"{pct(tpot, 50) * 1e3:.0f} ms / {pct(tpot, 99) * 1e3:.0f} ms"),
            ("throughput", f"{tokens / end:.1f} tokens/s over {end:.1f} s"),
            ("reconfigurations", f"{drops} drop(s), {restores} restore(s)")]
    print()
    for k, v in rows:
        print(f"  {k:<28} {v}")
    for q in reqs:
        if q.error:
            print(f"  {q.item.request_id} failed: {q.error}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    twin = ax.twinx()
    for i, a in enumerate(sorted({s.agent for s in timeline})):
        pts = [s for s in timeline if s.agent == a]
        ts = [s.t for s in pts]
        ax.plot(ts, [s.blocks_total - s.blocks_free for s in pts], color=f"C{i}", label=f"{a} KV blocks used")
        ax.plot(ts, [s.blocks_total for s in pts], color=f"C{i}", ls=":", lw=0.8)
        twin.step(ts, [s.layers_held for s in pts], where="post", color=f"C{i}", ls="--", lw=1)
    for r in reconfs:
        if r.kind != "other":
            color = "tab:red" if r.kind == "drop" else "tab:green"
            for a in (ax, ax2):
                a.axvline(r.t, color=color, lw=1.5)
            ax.annotate(r.kind, (r.t, 0), rotation=90, fontsize=8, color=color)
    ax.set_ylabel("KV blocks used (solid), total (dotted)")
    twin.set_ylabel("layers held (dashed)")
    ax.set_title("KV usage and layers held per agent; drops (red) and restores (green)")
    ax.legend(loc="upper left", fontsize=8)
    ax2.scatter([r.item.arrival_s for r in ok], ttft, s=10)
    ax2.set_yscale("log")
    ax2.set_ylabel("TTFT (s)")
    ax2.set_xlabel("seconds since the burst workload started (by arrival)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    print(f"\n  plot: {png}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path(".models/smollm2-135m"))
    ap.add_argument("--pool", type=Path, default=HERE / "demo-pool.yaml")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per agent")
    ap.add_argument("--calm", type=float, default=5.0)
    ap.add_argument("--burst", type=float, default=10.0)
    ap.add_argument("--after", type=float, default=8.0)
    ap.add_argument("--rate", type=float, default=0.4, help="calm arrivals per second")
    ap.add_argument("--peak-factor", type=float, default=8.0)
    ap.add_argument("--cv", type=float, default=2.0)
    ap.add_argument("--prompt-median", type=int, default=100)
    ap.add_argument("--output-median", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--restore-wait", type=float, default=30.0, help="seconds to wait for the restore at the end")
    ap.add_argument("--start-timeout", type=float, default=240.0)
    ap.add_argument("--png", type=Path, default=Path("bench/results/demo.png"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.model / "config.json").is_file():
        print(f"demo: no checkpoint at {args.model} (make model)")
        return 2
    with tempfile.TemporaryDirectory(prefix="kunserve-demo-") as tmp:
        workdir = Path(tmp)
        print(f"demo: kunserve up -f {args.pool} (4 agents of {args.model.name}, logs in {workdir / 'up'})", flush=True)
        up = start_up(args, workdir)
        previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            url = wait_gateway(up, args.start_timeout)
            print(f"demo: pool serving at {url} after {time.monotonic() - up.t0:.0f} s", flush=True)
            reqs, timeline, end, t0 = asyncio.run(burst(args, url, workdir))
            offset = t0 - up.t0
            reconfs = [Reconf(r.t - offset, r.line) for r in up.reconfs]
            report(reqs, timeline, end, reconfs, args.png)
            return 0 if all(not r.error for r in reqs) else 1
        except KeyboardInterrupt:
            print("\ndemo: interrupted", flush=True)
            return 130
        except (RuntimeError, TimeoutError) as exc:
            print(f"demo: {exc}", flush=True)
            return 1
        finally:
            print("demo: stopping the pool (gateway, agents, redis)", flush=True)
            up.stop()
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
