"""Summaries, ratios, the table and the PNG of the burst benchmark (bench/burst.py)."""

from __future__ import annotations

import argparse
import math
import statistics
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.burst import PolicyRun

Summary = dict[str, Any]


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank; nan when empty)."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def coop_windows(run: PolicyRun, end: float) -> list[tuple[float, float]]:
    """[drop committed, restore started) intervals: the cooperative phase."""
    out, start = [], None
    for e in sorted(run.events, key=lambda e: e.start_s):
        if e.kind == "drop":
            start = e.end_s
        elif e.kind == "restore" and start is not None:
            out.append((start, e.start_s))
            start = None
    if start is not None:
        out.append((start, end))
    return out


def policy_summary(run: PolicyRun, args: argparse.Namespace) -> Summary:
    recs = run.records
    done = [r for r in recs if r.finished]
    ttft = [r.ttft_s for r in done]
    tpot = [t for r in done if (t := r.tpot_s) is not None]
    a, b = run.prefill_fit
    queue = [max(0.0, r.ttft_s - (a + b * r.prompt_len)) for r in done]
    burst = [r.ttft_s for r in done if r.phase == "burst"]
    ok = [r for r in done if r.ttft_s <= args.slo_ttft and (r.tpot_s or 0.0) <= args.slo_tpot]
    first = min((r.arrival_s for r in recs), default=0.0)
    last = max((r.token_times[-1] for r in recs if r.token_times), default=first)
    tokens = sum(len(r.token_times) for r in recs)
    end = max(last, run.wall_s)
    windows = coop_windows(run, end)
    gaps_in: list[float] = []
    gaps_out: list[float] = []
    for r in done:
        for x, y in pairwise(r.token_times):
            if y - x <= 0:
                continue  # tokens of one message
            (gaps_in if any(lo <= x and y <= hi for lo, hi in windows) else gaps_out).append(y - x)
    c = run.counters
    return {
        "requests": len(recs), "finished": len(done), "retries": sum(r.retries for r in recs),
        "ttft_p50_s": pct(ttft, 50), "ttft_p90_s": pct(ttft, 90), "ttft_p99_s": pct(ttft, 99),
        "tpot_p50_s": pct(tpot, 50), "tpot_p90_s": pct(tpot, 90), "tpot_p99_s": pct(tpot, 99),
        "queue_p50_s": pct(queue, 50), "queue_p99_s": pct(queue, 99), "queue_mean_s": statistics.fmean(queue or [0]),
        "prefill_est_mean_s": statistics.fmean([a + b * r.prompt_len for r in done] or [0]),
        "burst_ttft_p99_s": pct(burst, 99), "burst_ttft_p50_s": pct(burst, 50),
        "slo_attainment": len(ok) / len(recs) if recs else math.nan,
        "throughput_tokens_s": tokens / (last - first) if last > first else math.nan,
        "makespan_s": last - first,
        "reconfigurations": sum(e.kind in ("drop", "restore") for e in run.events),
        "failed_reconfigurations": sum(e.kind == "failed" for e in run.events),
        "migrations": sum(e.kind == "migrate" for e in run.events),
        "migrated_kv_bytes": sum(e.kv_bytes for e in run.events if e.kind == "migrate"),
        "preemptions": int(c.get("vllm:num_preemptions_total", 0)),
        "remote_attention_calls": int(c.get("kunserve_remote_attention_calls_total", 0)),
        "kv_exchange_bytes": int(c.get("kunserve_kv_exchange_bytes_total", 0)),
        "coop_seconds": sum(hi - lo for lo, hi in windows),
        "token_gap_coop_p50_s": pct(gaps_in, 50), "token_gap_other_p50_s": pct(gaps_out, 50),
        "token_gap_coop_mean_s": statistics.fmean(gaps_in) if gaps_in else math.nan,
        "token_gap_other_mean_s": statistics.fmean(gaps_out) if gaps_out else math.nan,
    }


RATIO_KEYS = ("ttft_p50_s", "ttft_p99_s", "burst_ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "queue_p99_s",
              "throughput_tokens_s", "slo_attainment")


def ratios(summaries: dict[str, Summary]) -> dict[str, dict[str, float]]:
    """Each policy's value divided by kunserve's (> 1 on latency: kunserve is faster)."""
    base = summaries.get("kunserve")
    if base is None:
        return {}
    out: dict[str, dict[str, float]] = {}
    for name, s in summaries.items():
        out[name] = {k: (s[k] / base[k] if base[k] and not math.isnan(base[k]) else math.nan) for k in RATIO_KEYS}
    return out


def print_table(summaries: dict[str, Summary], rel: dict[str, dict[str, float]]) -> None:
    cols = [("done", "finished", "{:.0f}"), ("TTFT p50", "ttft_p50_s", "{:.2f}"), ("p90", "ttft_p90_s", "{:.2f}"),
            ("p99", "ttft_p99_s", "{:.2f}"), ("burst p99", "burst_ttft_p99_s", "{:.2f}"),
            ("TPOT p50", "tpot_p50_s", "{:.3f}"), ("p90", "tpot_p90_s", "{:.3f}"), ("p99", "tpot_p99_s", "{:.3f}"),
            ("queue p50", "queue_p50_s", "{:.2f}"), ("p99", "queue_p99_s", "{:.2f}"),
            ("SLO", "slo_attainment", "{:.0%}"), ("tok/s", "throughput_tokens_s", "{:.1f}"),
            ("reconf", "reconfigurations", "{:.0f}"), ("migr", "migrations", "{:.0f}"),
            ("preempt", "preemptions", "{:.0f}")]
    print("\n(seconds; queue = TTFT - idle prefill estimate)")
    print(f"{'policy':<9}" + "".join(f"{h:>10}" for h, _, _ in cols))
    for name, s in summaries.items():
        print(f"{name:<9}" + "".join(f"{f.format(s[k]):>10}" for _, k, f in cols))
    if rel:
        print("\nratio vs kunserve (baseline / kunserve)")
        keys = list(RATIO_KEYS)
        print(f"{'policy':<9}" + "".join(f"{k.replace('_s', '')[:16]:>17}" for k in keys))
        for name, r in rel.items():
            print(f"{name:<9}" + "".join(f"{r[k]:>16.2f}x" for k in keys))
    k = summaries.get("kunserve")
    if k and k["coop_seconds"]:
        print(f"\nkunserve cooperative phase {k['coop_seconds']:.1f} s: median token gap "
              f"{k['token_gap_coop_p50_s'] * 1e3:.1f} ms vs {k['token_gap_other_p50_s'] * 1e3:.1f} ms outside it")


def plot(runs: list[PolicyRun], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 11))
    ax = axes[0]
    for run in runs:
        done = [r for r in run.records if r.token_times]
        ax.scatter([r.arrival_s for r in done], [r.ttft_s for r in done], s=8, label=run.policy.value, alpha=0.7)
    ax.axvspan(args.calm, args.calm + args.burst, color="tab:orange", alpha=0.08, label="burst")
    ax.set_yscale("log")
    ax.set_xlabel("arrival (s)")
    ax.set_ylabel("TTFT (s)")
    ax.set_title("TTFT by arrival time")
    ax.legend(loc="upper left", fontsize=8)
    kun = next((r for r in runs if r.policy.value == "kunserve"), runs[0])
    ax = axes[1]
    agents = sorted({s.agent for s in kun.timeline})
    twin = ax.twinx()
    for i, a in enumerate(agents):
        pts = [s for s in kun.timeline if s.agent == a]
        color = f"C{i}"
        ax.plot([s.t for s in pts], [(s.blocks_total - s.blocks_free) for s in pts], color=color, label=f"{a} KV used")
        ax.plot([s.t for s in pts], [s.blocks_total for s in pts], color=color, ls=":", lw=0.8)
        twin.step([s.t for s in pts], [s.layers_held for s in pts], where="post", color=color, ls="--", lw=1)
    for e in kun.events:
        if e.kind in ("drop", "restore"):
            ax.axvspan(e.start_s, e.end_s, color="tab:red" if e.kind == "drop" else "tab:green", alpha=0.2)
            ax.annotate(e.kind, (e.start_s, ax.get_ylim()[1] * 0.95), fontsize=8)
    ax.set_ylabel("KV blocks used (solid) / total (dotted)")
    twin.set_ylabel("layers held (dashed)")
    ax.set_xlabel("seconds")
    ax.set_title(f"{kun.policy.value}: KV blocks and layers held per agent, drops (red) and restores (green)")
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[2]
    names = [r.policy.value for r in runs]
    width = 0.27
    for j, (key, label) in enumerate((("ttft_p50_s", "TTFT p50"), ("ttft_p99_s", "TTFT p99"),
                                      ("burst_ttft_p99_s", "burst TTFT p99"))):
        vals = [policy_summary(r, args)[key] for r in runs]
        ax.bar([i + (j - 1) * width for i in range(len(runs))], vals, width, label=label)
    ax.set_xticks(range(len(runs)), names)
    ax.set_yscale("log")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
