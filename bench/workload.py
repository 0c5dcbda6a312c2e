"""A BurstGPT-shaped workload: a calm phase, a burst, a calm phase; prompt and output lengths long-tailed.

BurstGPT (Wang et al., 2024, traces of Azure OpenAI GPT services) shows bursty arrivals whose inter-arrival
times are gamma-distributed with a coefficient of variation (CV) well above 1 during bursts, and request /
response lengths with a long tail (request tokens roughly Zipf, responses with a heavy right tail). Here:
- arrivals: a gamma renewal process per phase (rate `base_rate` in the calm phases, `base_rate x peak_factor`
  in the burst; shape 1/CV^2, so CV 1 is Poisson and larger CVs clump arrivals);
- prompt and output lengths: log-normal (median and sigma per kind), clipped to [min, max];
- prompt token ids: uniform over the vocabulary range, from the same seed.
Everything is a pure function of the configuration and the seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import StrEnum


class Phase(StrEnum):
    CALM = "calm"
    BURST = "burst"
    AFTER = "after"


@dataclass(slots=True, frozen=True)
class BurstShape:
    calm_s: float = 10.0  # calm phase before the burst
    burst_s: float = 15.0
    after_s: float = 20.0  # calm phase after it
    base_rate: float = 0.5  # requests/s in the calm phases
    peak_factor: float = 8.0  # burst rate = base_rate x peak_factor
    cv: float = 2.0  # coefficient of variation of inter-arrival times in the burst (calm phases: 1)


@dataclass(slots=True, frozen=True)
class Lengths:
    prompt_median: int = 160
    prompt_sigma: float = 0.8
    prompt_min: int = 8
    prompt_max: int = 768
    output_median: int = 64
    output_sigma: float = 0.7
    output_min: int = 4
    output_max: int = 256


@dataclass(slots=True, frozen=True)
class WorkItem:
    request_id: str
    arrival_s: float  # seconds after the workload starts
    prompt_len: int
    output_len: int
    phase: Phase


def _gamma_arrivals(rng: random.Random, start: float, end: float, rate: float, cv: float) -> list[float]:
    if rate <= 0:
        return []
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    out: list[float] = []
    t = start
    while True:
        t += rng.gammavariate(shape, scale)
        if t >= end:
            return out
        out.append(t)


def _lognormal(rng: random.Random, median: int, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, round(math.exp(rng.gauss(math.log(median), sigma)))))


def generate(shape: BurstShape, lengths: Lengths, seed: int) -> list[WorkItem]:
    rng = random.Random(seed)
    phases = [(Phase.CALM, 0.0, shape.calm_s, shape.base_rate, 1.0),
              (Phase.BURST, shape.calm_s, shape.calm_s + shape.burst_s, shape.base_rate * shape.peak_factor, shape.cv),
              (Phase.AFTER, shape.calm_s + shape.burst_s, shape.calm_s + shape.burst_s + shape.after_s,
               shape.base_rate, 1.0)]
    items: list[WorkItem] = []
    for phase, start, end, rate, cv in phases:
        for t in _gamma_arrivals(rng, start, end, rate, cv):
            items.append(WorkItem(
                f"r{len(items):04d}", round(t, 4),
                _lognormal(rng, lengths.prompt_median, lengths.prompt_sigma, lengths.prompt_min, lengths.prompt_max),
                _lognormal(rng, lengths.output_median, lengths.output_sigma, lengths.output_min, lengths.output_max),
                phase))
    return items


def prompt_ids(item: WorkItem, seed: int, vocab_size: int) -> list[int]:
    """The prompt's token ids (ids 0-99 are left out: special tokens live there in most vocabularies)."""
    rng = random.Random(f"{seed}:{item.request_id}")
    return [rng.randrange(100, vocab_size) for _ in range(item.prompt_len)]


def summary(items: list[WorkItem]) -> dict[str, float | int]:
    by = {p: [i for i in items if i.phase is p] for p in Phase}
    return {"requests": len(items), **{f"{p.value}_requests": len(v) for p, v in by.items()},
            "prompt_tokens": sum(i.prompt_len for i in items), "output_tokens": sum(i.output_len for i in items)}
