"""Reconfiguration cost: drop latency, restore duration, KV bytes exchanged, and the TPOT of requests that
keep running before / during / after a drop, for groups of g agent processes on one machine.

Each agent gets `--requests` long greedy requests; once every request has `--phase-tokens` tokens the
group drops (Prepare on every member, Commit on the leader), `--phase-tokens` later it restores, and the
requests run on to the end. TPOT per phase is the gap between consecutive tokens of a request with both
tokens inside the phase; the pause a reconfiguration puts into a stream is reported separately. Prints a
table, writes JSON and a PNG (token gaps over time with the drop and restore marked). Asserts no timing.

    python bench/reconfigure.py --model .models/tiny --groups 2 4
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path

import torch

from kunserve.agent.group_client import Stream, even_ranges, metric, reconfigure, status, wait_until
from kunserve.agent.launch import start_agent
from kunserve.rpc.v1 import agent_pb2, inference_pb2


@dataclass(slots=True)
class Phase:
    tokens: int  # token gaps measured
    tpot_p50_ms: float
    tpot_p90_ms: float
    tpot_mean_ms: float


@dataclass(slots=True)
class Run:
    group_size: int
    requests: int
    prepare_ms: float  # Prepare on every member (parallel client calls), drop
    drop_commit_ms: float  # the leader's Commit: every member dropped, requests handed over, group running
    drop_blocks_usable_ms: float  # the slowest member: weights freed -> new KV blocks usable
    restore_prepare_ms: float  # Prepare of the restore (weights read into host memory on every member)
    restore_commit_ms: float  # drain, KV back to owners, weights in, pools rebuilt, replicas serving
    restore_member_max_ms: float
    kv_exchange_bytes: int  # moved by the live KV exchange during the cooperative phase
    restore_kv_bytes: int  # moved back to the owners by the restore
    remote_attention_calls: int
    stall_drop_ms: float  # the longest token gap of any request across the drop
    stall_restore_ms: float
    phases: dict[str, Phase] = field(default_factory=dict)


def _phase(streams: list[Stream], lo: float, hi: float) -> Phase:
    gaps = [b - a for s in streams for a, b in pairwise(s.times) if lo <= a and b <= hi]
    if not gaps:
        return Phase(0, float("nan"), float("nan"), float("nan"))
    q = statistics.quantiles(gaps, n=10) if len(gaps) > 1 else [gaps[0]] * 9
    return Phase(len(gaps), statistics.median(gaps) * 1e3, q[8] * 1e3, statistics.fmean(gaps) * 1e3)


def _stall(streams: list[Stream], lo: float, hi: float) -> float:
    """Largest gap between consecutive tokens whose interval overlaps [lo, hi]."""
    return max((b - a for s in streams for a, b in pairwise(s.times) if a <= hi and b >= lo),
               default=0.0) * 1e3


def run_group(model: Path, g: int, requests: int, phase_tokens: int, workdir: Path) -> tuple[Run, list[Stream], dict]:
    max_tokens = 3 * phase_tokens + 20
    agents = [start_agent(model, workdir / f"g{g}-a{i}", "--agent-id", f"a{i}", "--num-kv-blocks", "1024")
              for i in range(g)]
    try:
        layers = status(agents[0]).num_layers
        params = inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        streams = [Stream(agents[i % g], f"r{i}", [3 + (i * 13 + j) % 200 for j in range(24)], params).start()
                   for i in range(g * requests)]
        wait_until(lambda: min(len(s.tokens) for s in streams) >= phase_tokens, timeout=600)
        t_prep = time.monotonic()
        ranges = even_ranges(layers, g)
        # Prepare and commit timed apart: reconfigure() runs both; time the commit from the member results.
        drop = reconfigure(agents, agent_pb2.ACTION_DROP, ranges, epoch=1, reason="bench")
        t_drop = time.monotonic()
        wait_until(lambda: min(len(s.tokens) for s in streams) >= 2 * phase_tokens, timeout=600)
        exchanged = int(sum(metric(a, "kunserve_kv_exchange_bytes_total") for a in agents))
        calls = int(sum(metric(a, "kunserve_remote_attention_calls_total", side="made") for a in agents))
        t_rprep = time.monotonic()
        restore = reconfigure(agents, agent_pb2.ACTION_RESTORE, ranges, epoch=2, reason="bench")
        t_restore = time.monotonic()
        for s in streams:
            s.wait(600)
            if s.error is not None:
                raise RuntimeError(f"{s.request_id} failed: {s.error}")
        restore_bytes = int(sum(metric(a, "kunserve_kv_exchange_bytes_total") for a in agents)) - exchanged
        start = min(s.times[0] for s in streams)
        end = max(s.times[-1] for s in streams)
        run = Run(
            group_size=g, requests=len(streams),
            prepare_ms=((t_drop - t_prep) - drop.seconds) * 1e3, drop_commit_ms=drop.seconds * 1e3,
            drop_blocks_usable_ms=max(m.seconds for m in drop.members) * 1e3,
            restore_prepare_ms=((t_restore - t_rprep) - restore.seconds) * 1e3,
            restore_commit_ms=restore.seconds * 1e3,
            restore_member_max_ms=max(m.seconds for m in restore.members) * 1e3,
            kv_exchange_bytes=exchanged, restore_kv_bytes=restore_bytes, remote_attention_calls=calls,
            stall_drop_ms=_stall(streams, t_drop - drop.seconds, t_drop),
            stall_restore_ms=_stall(streams, t_restore - restore.seconds, t_restore),
            phases={"before": _phase(streams, start, t_prep), "during": _phase(streams, t_drop, t_rprep),
                    "after": _phase(streams, t_restore, end)},
        )
        marks = {"drop": (t_drop - drop.seconds - start, t_drop - start),
                 "restore": (t_restore - restore.seconds - start, t_restore - start), "start": start}
        return run, streams, marks
    finally:
        for a in agents:
            a.stop()


def plot(results: list[tuple[Run, list[Stream], dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(9, 3.2 * len(results)), squeeze=False)
    for ax, (run, streams, marks) in zip(axes[:, 0], results, strict=True):
        for s in streams:
            t = [x - marks["start"] for x in s.times]
            ax.plot(t[1:], [(b - a) * 1e3 for a, b in pairwise(t)], lw=0.6, alpha=0.6)
        for name, color in (("drop", "tab:red"), ("restore", "tab:green")):
            lo, hi = marks[name]
            ax.axvspan(lo, hi, color=color, alpha=0.25, label=f"{name} commit")
        ax.set_yscale("log")
        ax.set_ylabel("token gap (ms)")
        ax.set_title(f"g = {run.group_size}: {run.requests} requests decoding through a drop and a restore")
        ax.legend(loc="upper right")
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--groups", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--requests", type=int, default=4, help="long requests per agent")
    ap.add_argument("--phase-tokens", type=int, default=150, help="tokens per request before, during, after")
    ap.add_argument("--out", type=Path, default=Path("bench/results/reconfigure.json"))
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="kunserve-bench-") as tmp:
        for g in args.groups:
            print(f"g = {g}: starting {g} agents ...", flush=True)
            results.append(run_group(args.model, g, args.requests, args.phase_tokens, Path(tmp)))
    head = (f"{'g':>2} {'reqs':>4} {'prepare':>8} {'commit':>8} {'usable':>7} {'r.prep':>7} {'restore':>8} "
            f"{'KV xchg':>9} {'KV back':>9} {'remote':>6} {'stall d':>8} {'stall r':>8} "
            f"{'TPOT before':>12} {'during':>8} {'after':>8}")
    print("\n(ms unless noted; KV in KiB; TPOT = median token gap)")
    print(head)
    for run, _, _ in results:
        p = run.phases
        print(f"{run.group_size:>2} {run.requests:>4} {run.prepare_ms:>8.1f} {run.drop_commit_ms:>8.1f} "
              f"{run.drop_blocks_usable_ms:>7.2f} {run.restore_prepare_ms:>7.1f} {run.restore_commit_ms:>8.1f} "
              f"{run.kv_exchange_bytes / 1024:>9.0f} {run.restore_kv_bytes / 1024:>9.0f} "
              f"{run.remote_attention_calls:>6} {run.stall_drop_ms:>8.1f} {run.stall_restore_ms:>8.1f} "
              f"{p['before'].tpot_p50_ms:>12.2f} {p['during'].tpot_p50_ms:>8.2f} {p['after'].tpot_p50_ms:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"model": str(args.model), "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                                                    "torch": torch.__version__},
              "config": vars(args) | {"out": str(args.out), "model": str(args.model)},
              "runs": [asdict(r) for r, _, _ in results]}
    args.out.write_text(json.dumps(report, indent=2))
    png = args.out.with_suffix(".png")
    plot(results, png)
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
