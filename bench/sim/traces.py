"""Request traces: seeded generators shaped like BurstGPT and the Azure LLM inference traces, and a loader
for a real trace CSV in BurstGPT's column format.

Shapes (all seeded with numpy's PCG64, so a (spec, seed) pair always gives the same requests):
- arrivals: a renewal process with Gamma inter-arrivals of a given coefficient of variation (CV 1 is
  Poisson; BurstGPT fits Gamma arrivals with CV > 1), piecewise in phases: base rate, then a burst of
  `burst_factor` x the base rate for `burst_len_s`, then the base rate again.
- BurstGPT-shaped lengths (Wang et al., "BurstGPT", 2024: Zipf-distributed request tokens; ChatGPT
  conversation responses of a few hundred tokens): prompts from a power law p(x) ~ x^-0.8 on [16, 3072]
  (median ~430, mean ~790 tokens), responses log-normal with median 280 and sigma 0.8 (mean ~385).
- Azure-shaped lengths (Patel et al., "Splitwise", ISCA 2024, Azure LLM inference trace 2023): conversation
  prompts median ~1020 / outputs median ~129 tokens; code prompts median ~1500 / outputs median ~13. Both
  log-normal around those medians (sigma is our assumption).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np


class TraceError(ValueError):
    """A trace file or trace spec cannot be used (the message says which row or field)."""


class TraceKind(StrEnum):
    BURSTGPT = "burstgpt"
    AZURE_CONV = "azure-conv"
    AZURE_CODE = "azure-code"


@dataclass(slots=True, frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(slots=True, frozen=True)
class LengthShape:
    """prompt: power law (alpha > 0) on [lo, hi], or log-normal (alpha == 0) with median and sigma."""

    prompt_alpha: float
    prompt_lo: int
    prompt_hi: int
    prompt_median: float
    prompt_sigma: float
    output_median: float
    output_sigma: float
    default_cv: float


SHAPES: dict[TraceKind, LengthShape] = {
    TraceKind.BURSTGPT: LengthShape(0.8, 16, 3072, 0.0, 0.0, 280.0, 0.8, default_cv=2.0),
    TraceKind.AZURE_CONV: LengthShape(0.0, 16, 6144, 1020.0, 0.9, 129.0, 1.0, default_cv=1.5),
    TraceKind.AZURE_CODE: LengthShape(0.0, 16, 6144, 1500.0, 0.8, 13.0, 1.2, default_cv=1.5),
}


@dataclass(slots=True, frozen=True)
class TraceSpec:
    kind: TraceKind = TraceKind.BURSTGPT
    duration_s: float = 120.0
    base_rate: float = 10.0  # requests / s outside the burst
    burst_factor: float = 4.0  # rate multiplier during the burst
    burst_start_s: float = 30.0
    burst_len_s: float = 30.0
    cv: float | None = None  # inter-arrival coefficient of variation; None: the kind's default
    seed: int = 0
    max_prompt: int = 4096
    max_output: int = 2048
    output_scale: float = 1.0  # multiplies the output lengths (long, chain-of-thought-like responses)

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.base_rate <= 0 or self.burst_factor <= 0:
            raise TraceError("duration_s, base_rate and burst_factor must be > 0")
        if self.burst_start_s < 0 or self.burst_len_s < 0:
            raise TraceError("burst_start_s and burst_len_s must be >= 0")
        if self.cv is not None and self.cv <= 0:
            raise TraceError(f"cv must be > 0, got {self.cv}")
        if self.output_scale <= 0:
            raise TraceError(f"output_scale must be > 0, got {self.output_scale}")
        if self.max_prompt < 1 or self.max_output < 1:
            raise TraceError("max_prompt and max_output must be >= 1")

    def phases(self) -> list[tuple[float, float, float]]:
        """(start, end, rate) pieces covering [0, duration_s)."""
        b0 = min(self.burst_start_s, self.duration_s)
        b1 = min(self.burst_start_s + self.burst_len_s, self.duration_s)
        pieces = [(0.0, b0, self.base_rate), (b0, b1, self.base_rate * self.burst_factor),
                  (b1, self.duration_s, self.base_rate)]
        return [p for p in pieces if p[1] > p[0]]


def gamma_arrivals(rng: np.random.Generator, start: float, end: float, rate: float, cv: float) -> list[float]:
    """Arrival times in [start, end) of a renewal process with Gamma(shape=1/cv^2) inter-arrivals of mean
    1/rate. Each phase restarts the process (a burst begins at its start)."""
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    out: list[float] = []
    t = start
    expected = int((end - start) * rate * 1.2) + 16
    while True:
        gaps = rng.gamma(shape, scale, size=expected)
        for gap in gaps:
            t += float(gap)
            if t >= end:
                return out
            out.append(t)


def _lengths(rng: np.random.Generator, shape: LengthShape, n: int, max_prompt: int,
             max_output: int, output_scale: float) -> tuple[np.ndarray, np.ndarray]:
    if shape.prompt_alpha > 0:
        e = 1.0 - shape.prompt_alpha
        lo, hi = float(shape.prompt_lo), float(shape.prompt_hi)
        u = rng.random(n)
        prompts = (lo**e + u * (hi**e - lo**e)) ** (1.0 / e)
    else:
        prompts = rng.lognormal(math.log(shape.prompt_median), shape.prompt_sigma, n)
        prompts = np.clip(prompts, shape.prompt_lo, shape.prompt_hi)
    outputs = rng.lognormal(math.log(shape.output_median * output_scale), shape.output_sigma, n)
    p = np.clip(np.rint(prompts), 1, max_prompt).astype(np.int64)
    o = np.clip(np.rint(outputs), 1, max_output).astype(np.int64)
    return p, o


def generate(spec: TraceSpec) -> list[TraceRequest]:
    """The requests of a trace spec, in arrival order (deterministic for a spec)."""
    shape = SHAPES[spec.kind]
    cv = spec.cv if spec.cv is not None else shape.default_cv
    rng = np.random.default_rng(spec.seed)
    times: list[float] = []
    for start, end, rate in spec.phases():
        times.extend(gamma_arrivals(rng, start, end, rate, cv))
    prompts, outputs = _lengths(rng, shape, len(times), spec.max_prompt, spec.max_output, spec.output_scale)
    return [TraceRequest(t, int(p), int(o)) for t, p, o in zip(times, prompts, outputs, strict=True)]


def as_trace_requests(items: Iterable[object]) -> list[TraceRequest]:
    """Requests from any items with arrival_s and prompt_tokens / output_tokens (or prompt_len / output_len,
    as the burst benchmark's WorkItem has them), in arrival order."""
    out = []
    for item in items:
        if isinstance(item, TraceRequest):
            out.append(item)
            continue
        try:
            prompt = getattr(item, "prompt_tokens", None) or item.prompt_len  # type: ignore[attr-defined]
            output = getattr(item, "output_tokens", None) or item.output_len  # type: ignore[attr-defined]
            out.append(TraceRequest(float(item.arrival_s), int(prompt), int(output)))  # type: ignore[attr-defined]
        except AttributeError as exc:
            raise TraceError(f"{item!r} has no arrival_s / prompt / output lengths") from exc
    return sorted(out, key=lambda r: r.arrival_s)


BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")


def load_burstgpt_csv(path: Path | str, *, start_s: float = 0.0, duration_s: float | None = None,
                      time_scale: float = 1.0, model: str | None = None, log_type: str | None = None,
                      keep_failures: bool = False, max_prompt: int = 4096, max_output: int = 2048,
                      limit: int | None = None) -> list[TraceRequest]:
    """Requests from a trace CSV with BurstGPT's columns (Timestamp in seconds, Model, Request tokens,
    Response tokens, Total tokens, Log Type). Rows with Timestamp in [start_s, start_s + duration_s) are
    kept, shifted to start at 0 and divided by time_scale (2.0 replays twice as fast). Failed requests
    (Response tokens == 0) are dropped unless keep_failures; lengths are clipped to the maxima."""
    if time_scale <= 0:
        raise TraceError(f"time_scale must be > 0, got {time_scale}")
    path = Path(path)
    out: list[TraceRequest] = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in BURSTGPT_COLUMNS[:4] if c not in (reader.fieldnames or [])]
        if missing:
            raise TraceError(f"{path}: missing columns {missing} (BurstGPT format: {', '.join(BURSTGPT_COLUMNS)})")
        for lineno, row in enumerate(reader, start=2):
            try:
                ts = float(row["Timestamp"])
                prompt, response = int(float(row["Request tokens"])), int(float(row["Response tokens"]))
            except (TypeError, ValueError) as exc:
                raise TraceError(f"{path}:{lineno}: {exc}") from exc
            if ts < start_s or (duration_s is not None and ts >= start_s + duration_s):
                continue
            if model is not None and row.get("Model") != model:
                continue
            if log_type is not None and row.get("Log Type") != log_type:
                continue
            if response <= 0 and not keep_failures:
                continue
            out.append(TraceRequest((ts - start_s) / time_scale, min(max(prompt, 1), max_prompt),
                                    min(max(response, 1), max_output)))
            if limit is not None and len(out) >= limit:
                break
    out.sort(key=lambda r: r.arrival_s)
    return out


def write_burstgpt_csv(path: Path | str, requests: Iterable[TraceRequest], model: str = "ChatGPT") -> None:
    """Write requests in BurstGPT's column format (what load_burstgpt_csv reads back)."""
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(BURSTGPT_COLUMNS)
        for r in requests:
            w.writerow([f"{r.arrival_s:.6f}", model, r.prompt_tokens, r.output_tokens,
                        r.prompt_tokens + r.output_tokens, "Conversation log"])


def describe(requests: list[TraceRequest]) -> dict[str, float]:
    """Count, mean rate and length statistics of a trace."""
    if not requests:
        return {"requests": 0}
    p = np.array([r.prompt_tokens for r in requests])
    o = np.array([r.output_tokens for r in requests])
    span = max(requests[-1].arrival_s - requests[0].arrival_s, 1e-9)
    gaps = np.diff([r.arrival_s for r in requests])
    cv = float(gaps.std() / gaps.mean()) if len(gaps) > 1 and gaps.mean() > 0 else 0.0
    return {"requests": len(requests), "rate_per_s": len(requests) / span, "interarrival_cv": cv,
            "prompt_median": float(np.median(p)), "prompt_mean": float(p.mean()),
            "output_median": float(np.median(o)), "output_mean": float(o.mean())}
