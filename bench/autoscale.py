"""Autoscaling cold start, bridged or not: the same burst on a local pool (`kunserve up`'s LocalPool: real agent
processes, gateway, redis-server) under three policies:

- scale-out: spec.autoscaling only (elasticity off): new replicas, nothing meanwhile;
- drop: elasticity only (no autoscaling): the pool drops and waits for the burst to pass;
- drop+scale-out: both (the coordinated policy): drop at once, scale out, restore when the new replica serves.

The burst: --spike requests at once, then --rate requests/s for --tail seconds (greedy, ignore_eos). Each new
replica starts --startup-delay s after it is asked for (image pull and scheduling) and then loads its weights.
Reports P50/P99 time to first token (streamed through the gateway), time spent dropped (a group formed),
replica-seconds (the workload's replica count integrated over the run: a pod is paid for from the moment it is
asked for) and the run's length. Prints a table, writes JSON and a PNG. Asserts no timing.

    python bench/autoscale.py --model .models/tiny --startup-delay 8
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from kunserve.operator.local import LocalOptions, LocalPool, load_pool

MODES = ("scale-out", "drop", "drop+scale-out")
POOL = """\
apiVersion: kunserve.io/v1alpha1
kind: ServingPool
metadata: {{name: bench}}
spec:
  model: {{name: tiny, path: {path}}}
  replicas: 2
  elasticity: {{enabled: {elastic}, maxGroupSize: 2, dropDemand: 0.9, restoreDemand: 0.5, restoreWindowSeconds: 5}}
{autoscaling}  engine: {{maxNumSeqs: 64, maxModelLen: 256, maxNumBatchedTokens: 256, memoryBudgetBytes: {budget}}}
"""
AUTOSCALING = ("  autoscaling: {minReplicas: 2, maxReplicas: 3, targetDemand: 0.6, "
               "scaleDownStabilizationSeconds: 3600}\n")


@dataclass(slots=True)
class Result:
    mode: str
    requests: int
    ttft_p50_s: float
    ttft_p99_s: float
    dropped_s: float  # time with at least one group formed
    replica_seconds: float
    run_s: float
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (t, replicas, groups)
    events: list[tuple[float, str, str]] = field(default_factory=list)


async def stream(client: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int) -> float:
    """Seconds to the first token of a streamed completion (the stream is read to its end)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    start, first = time.monotonic(), None
    async with client.post(f"{url}/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if first is None and line.startswith(b"data:") and b'"text"' in line:
                first = time.monotonic() - start
    assert first is not None
    return first


async def run_mode(mode: str, args: argparse.Namespace, workdir: Path) -> Result:
    scaling = AUTOSCALING if mode != "drop" else ""
    pool_file = workdir / f"{mode}.yaml"
    pool_file.write_text(POOL.format(path=args.model.resolve(), elastic="false" if mode == "scale-out" else "true",
                                     autoscaling=scaling, budget=args.budget))
    options = LocalOptions(pool_file=pool_file, port=0, threads=1, workdir=workdir / mode, plan_interval_s=0.5,
                           pressure_interval_ms=100, startup_delay_s=args.startup_delay, start_timeout_s=300)
    local = LocalPool(load_pool(pool_file), options, out=lambda _line: None)
    stop = asyncio.Event()
    serving = asyncio.create_task(local.serve(stop))
    while not local.serving.is_set():
        if serving.done():
            raise RuntimeError(f"{mode}: the pool did not start")
        await asyncio.sleep(0.05)
    ctl = local.ctl
    assert ctl is not None
    t0 = time.monotonic()
    timeline: list[tuple[float, int, int]] = []

    async def sample() -> None:
        while True:
            replicas = ctl.scale.replicas if ctl.scale is not None else len(ctl.endpoints)
            timeline.append((time.monotonic() - t0, replicas, len(ctl.groups)))
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    prompts = [[3 + (i * 7 + j * 13) % 400 for j in range(args.prompt)] for i in range(10_000)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as client:
        calls = [asyncio.create_task(stream(client, local.gateway_url, prompts[i], args.max_tokens))
                 for i in range(args.spike)]
        for i in range(int(args.rate * args.tail)):
            await asyncio.sleep(1 / args.rate)
            calls.append(asyncio.create_task(stream(client, local.gateway_url, prompts[args.spike + i],
                                                    args.max_tokens)))
        ttfts = sorted(await asyncio.gather(*calls))
    run_s = time.monotonic() - t0
    sampler.cancel()
    stop.set()
    await serving
    dt = [(b[0] - a[0], a) for a, b in itertools.pairwise(timeline)]
    wall0 = ctl.events[0].at if ctl.events else 0.0
    return Result(mode=mode, requests=len(ttfts), ttft_p50_s=statistics.median(ttfts),
                  ttft_p99_s=ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
                  dropped_s=sum(d for d, s in dt if s[2] > 0), replica_seconds=sum(d * s[1] for d, s in dt),
                  run_s=run_s, timeline=timeline,
                  events=[(round(e.at - wall0, 3), e.kind, e.detail) for e in ctl.events])


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for r in results:
        ax.step([t for t, _, _ in r.timeline], [n + 0.03 * MODES.index(r.mode) for _, n, _ in r.timeline],
                where="post", label=f"{r.mode}: replicas")
        ax.fill_between([t for t, _, _ in r.timeline], 0, [0.3 if g else 0 for _, _, g in r.timeline], step="post",
                        alpha=0.3, label=f"{r.mode}: dropped")
    ax.set_xlabel("seconds since the burst")
    ax.set_ylabel("replicas")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory (kunserve make-model)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--startup-delay", type=float, default=8.0, help="seconds before a new replica's process starts")
    p.add_argument("--spike", type=int, default=24)
    p.add_argument("--rate", type=float, default=3.0)
    p.add_argument("--tail", type=float, default=20.0)
    p.add_argument("--prompt", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--budget", type=int, default=24_000_000, help="memory budget per agent in bytes")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="kunserve-autoscale-") as tmp:
        for mode in args.modes:
            results.append(asyncio.run(run_mode(mode, args, Path(tmp))))
    print(f"{'policy':<16}{'requests':>9}{'TTFT p50 s':>12}{'TTFT p99 s':>12}{'dropped s':>11}{'replica-s':>11}"
          f"{'run s':>8}")
    for r in results:
        print(f"{r.mode:<16}{r.requests:>9}{r.ttft_p50_s:>12.2f}{r.ttft_p99_s:>12.2f}{r.dropped_s:>11.1f}"
              f"{r.replica_seconds:>11.1f}{r.run_s:>8.1f}")
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "autoscale.json").write_text(json.dumps({"machine": machine, "settings": settings,
                                                        "results": [asdict(r) for r in results]}, indent=1))
    plot(results, args.out / "autoscale.png")
    print(f"wrote {args.out / 'autoscale.json'} and {args.out / 'autoscale.png'}")


if __name__ == "__main__":
    main()
