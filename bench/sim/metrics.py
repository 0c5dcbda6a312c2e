"""Tail latency summaries of a simulation: TTFT / TPOT percentiles, where the tail's TTFT goes, tables."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bench.sim.simulator import SimResult
from bench.sim.state import SimRequest

PERCENTILES = (50, 90, 99)


@dataclass(slots=True, frozen=True)
class Breakdown:
    """Mean seconds of the TTFT of a set of requests: waiting before admission, pipeline hops + remote
    attention, and the rest of the service time (prefill compute, batching with other work, pauses)."""

    requests: int
    ttft_s: float
    queue_s: float
    prefill_s: float
    hops_s: float


@dataclass(slots=True, frozen=True)
class Summary:
    policy: str
    deployment: str
    instances: int
    requests: int
    finished: int
    ttft_s: dict[str, float]  # p50 / p90 / p99 / mean
    tpot_s: dict[str, float]
    tail: Breakdown  # requests with TTFT >= the P99
    overall: Breakdown
    tokens_per_s: float
    counters: dict[str, float]
    sim_wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pcts(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {f"p{p}": float("nan") for p in PERCENTILES} | {"mean": float("nan")}
    arr = np.asarray(values)
    out = {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}
    out["mean"] = float(arr.mean())
    return out


def ttft(r: SimRequest) -> float:
    assert r.first_token is not None
    return r.first_token - r.arrival


def tpot(r: SimRequest) -> float | None:
    """(last token - first token) / (output tokens - 1); None for one-token outputs."""
    if r.finish is None or r.first_token is None or r.output < 2:
        return None
    return (r.finish - r.first_token) / (r.output - 1)


def breakdown(reqs: Iterable[SimRequest]) -> Breakdown:
    rows = [r for r in reqs if r.first_token is not None]
    if not rows:
        return Breakdown(0, 0.0, 0.0, 0.0, 0.0)
    n = len(rows)
    t = sum(ttft(r) for r in rows) / n
    q = sum(r.queue_s for r in rows) / n
    h = sum(r.hop_s for r in rows) / n
    return Breakdown(n, t, q, t - q - h, h)


def summarize(result: SimResult) -> Summary:
    done = [r for r in result.requests if r.finish is not None]
    ttfts = [ttft(r) for r in done]
    tpots = [x for x in (tpot(r) for r in done) if x is not None]
    p99 = float(np.percentile(ttfts, 99)) if ttfts else 0.0
    span = max((r.finish or 0.0) for r in done) - min(r.arrival for r in done) if done else 1.0
    tokens = sum(r.output for r in done)
    return Summary(
        policy=str(result.policy), deployment=result.deployment, instances=result.instances,
        requests=len(result.requests), finished=len(done), ttft_s=_pcts(ttfts), tpot_s=_pcts(tpots),
        tail=breakdown(r for r in done if ttft(r) >= p99), overall=breakdown(done),
        tokens_per_s=tokens / span if span > 0 else 0.0, counters=dict(result.counters), sim_wall_s=result.wall_s,
    )


def _ms(x: float) -> str:
    if x != x:  # nan
        return "-"
    return f"{x * 1e3:,.0f}" if x >= 1.0 else f"{x * 1e3:,.1f}"


def table(summaries: Sequence[Summary], baseline: str = "vllm") -> str:
    """A markdown table: TTFT and TPOT percentiles (ms) per policy and the P99 TTFT ratio to the baseline."""
    base = next((s for s in summaries if s.policy == baseline), None)
    head = ("| policy | finished | TTFT p50 | TTFT p90 | TTFT p99 | TPOT p50 | TPOT p90 | TPOT p99 | "
            f"p99 TTFT vs {baseline} | drops/restores | preempt | swaps | migr |")
    lines = [head, "|" + "---|" * 13]
    for s in summaries:
        ratio = base.ttft_s["p99"] / s.ttft_s["p99"] if base and s.ttft_s["p99"] > 0 else float("nan")
        c = s.counters
        lines.append(
            f"| {s.policy} | {s.finished}/{s.requests} | {_ms(s.ttft_s['p50'])} | {_ms(s.ttft_s['p90'])} | "
            f"{_ms(s.ttft_s['p99'])} | {_ms(s.tpot_s['p50'])} | {_ms(s.tpot_s['p90'])} | {_ms(s.tpot_s['p99'])} | "
            f"{ratio:.1f}x | {int(c.get('drops', 0))}/{int(c.get('restores', 0))} | {int(c.get('preemptions', 0))} | "
            f"{int(c.get('swaps', 0))} | {int(c.get('migrations', 0))} |"
        )
    return "\n".join(lines)


def breakdown_table(summaries: Sequence[Summary]) -> str:
    """Mean TTFT components (ms) of the P99 tail and of all requests."""
    lines = ["| policy | set | requests | TTFT | queueing | prefill + batching | pipeline hops |", "|" + "---|" * 7]
    for s in summaries:
        for name, b in (("tail (>= p99)", s.tail), ("all", s.overall)):
            lines.append(f"| {s.policy} | {name} | {b.requests} | {_ms(b.ttft_s)} | {_ms(b.queue_s)} | "
                         f"{_ms(b.prefill_s)} | {_ms(b.hops_s)} |")
    return "\n".join(lines)
