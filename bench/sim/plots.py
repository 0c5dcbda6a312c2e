"""PNG figures like the paper's: per run, load and reconfigurations over time, TTFT over time and TTFT /
TPOT distributions per policy; per grid, P99 TTFT and P99 TPOT bars per policy for every (model, trace)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from bench.sim.metrics import Summary, tpot, ttft
from bench.sim.simulator import SimResult

COLORS = {"kunserve": "tab:red", "vllm": "tab:blue", "swap": "tab:green", "llumnix": "tab:purple"}


def _cdf(ax: plt.Axes, values: Sequence[float], label: str) -> None:
    if not values:
        return
    xs = np.sort(np.asarray(values))
    ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label, color=COLORS.get(label))


def plot_run(results: Sequence[SimResult], path: Path, title: str) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    (load, over_time), (ttft_cdf, tpot_cdf) = axes
    first = results[0]
    arrivals = np.array([r.arrival for r in first.requests])
    if len(arrivals):
        bins = np.arange(0, arrivals.max() + 1.0, 1.0)
        load.hist(arrivals, bins=bins, color="0.7", label="arrivals / s")
    load.set_xlabel("time (s)")
    load.set_ylabel("requests / s")
    twin = load.twinx()
    for res in results:
        if res.timeline:
            t = [x[0] for x in res.timeline]
            twin.plot(t, [x[3] for x in res.timeline], color=COLORS.get(str(res.policy)), lw=1,
                      label=f"{res.policy} KV demand")
        for e in res.reconfigs:
            load.axvline(e["t"], color="tab:red" if e["action"] == "Drop" else "tab:orange", lw=0.8, ls="--")
    twin.set_ylabel("mean KV demand (dashed: drop / restore)")
    twin.legend(loc="upper right", fontsize=7)
    for res in results:
        done = [r for r in res.requests if r.first_token is not None]
        over_time.scatter([r.arrival for r in done], [ttft(r) for r in done], s=2, alpha=0.4,
                          color=COLORS.get(str(res.policy)), label=str(res.policy))
        _cdf(ttft_cdf, [ttft(r) for r in done], str(res.policy))
        _cdf(tpot_cdf, [x for x in (tpot(r) for r in done) if x is not None], str(res.policy))
    over_time.set_yscale("log")
    over_time.set_xlabel("arrival time (s)")
    over_time.set_ylabel("TTFT (s)")
    over_time.legend(markerscale=4, fontsize=7)
    for ax, name in ((ttft_cdf, "TTFT (s)"), (tpot_cdf, "TPOT (s)")):
        ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("CDF")
        ax.axhline(0.99, color="0.5", lw=0.5)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grid(cases: Mapping[str, Sequence[Summary]], path: Path, title: str) -> None:
    """cases: label (model / trace) -> the summaries of every policy on it."""
    labels = list(cases)
    policies = sorted({s.policy for ss in cases.values() for s in ss}, key=lambda p: list(COLORS).index(p)
                      if p in COLORS else 99)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(labels)), 4.5))
    width = 0.8 / max(1, len(policies))
    for ax, metric, name in ((axes[0], "ttft_s", "P99 TTFT (s)"), (axes[1], "tpot_s", "P99 TPOT (s)")):
        for j, pol in enumerate(policies):
            vals = []
            for lab in labels:
                s = next((x for x in cases[lab] if x.policy == pol), None)
                vals.append(getattr(s, metric)["p99"] if s else np.nan)
            ax.bar(np.arange(len(labels)) + j * width, vals, width, label=pol, color=COLORS.get(pol))
        ax.set_xticks(np.arange(len(labels)) + width * (len(policies) - 1) / 2)
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(name)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
