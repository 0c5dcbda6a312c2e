"""Calibration: run the real engine (LLMEngine on a checkpoint directory) on this device at a few prompt
lengths and batch sizes, and fit the simulator's StepCost to its measured step times.

Fit: one non-negative least-squares fit over every measured step (prefill steps of one prompt of L
tokens, decode steps of B sequences at a context of c tokens each) of

    t = fixed + seqs * seq_s + tokens * token_s + pairs * pair_s + ctx * ctx_s

(prefill: seqs 1, tokens L, pairs L(L+1)/2, ctx 0; decode: seqs B, tokens B, pairs 0, ctx B(c+1)). On a
CPU every measured step is compute- or overhead-bound, so the roofline floor weights_s is left at 0.
`fixed` is split into base_s (per step) and layer_base_s (per layer held, scaled by a stage's share of
the layers) by `layer_share`, an assumption: in eager PyTorch most fixed per-step time is per-layer
operator dispatch. The JSON keeps every point with the fit's prediction and error.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.sim.hardware import StepCost


@dataclass(slots=True, frozen=True)
class Point:
    kind: str  # "prefill" | "decode"
    batch: int
    tokens: int  # prompt length (prefill) or context per sequence (decode)
    seconds: float


def _fastest_step(engine: Any, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(model_dir: str, *, prompt_lens: Sequence[int], batch_sizes: Sequence[int], contexts: Sequence[int],
            reps: int, decode_steps: int, threads: int | None, max_num_seqs: int, max_num_batched_tokens: int,
            max_model_len: int, num_kv_blocks: int) -> tuple[list[Point], dict[str, Any]]:
    """Step times of the real engine, and what the simulator needs to know about it (sizes, config)."""
    import torch

    from kunserve.agent.engine.config import EngineConfig
    from kunserve.agent.engine.llm_engine import LLMEngine
    from kunserve.agent.engine.sequence import SamplingParams

    engine = LLMEngine(EngineConfig(model=model_dir, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                    max_num_batched_tokens=max_num_batched_tokens, num_kv_blocks=num_kv_blocks,
                                    torch_threads=threads, progress=False, seed=0))
    vocab = engine.model_config.vocab_size
    rng = np.random.default_rng(0)

    def prompt(n: int) -> list[int]:
        return [int(x) for x in rng.integers(3, vocab, size=n)]

    points: list[Point] = []
    engine.generate([prompt(8)], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    for length in prompt_lens:
        times = []
        for _ in range(reps):
            engine.add_request(prompt(length), SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
            t0 = time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step()
            times.append(time.perf_counter() - t0)
        points.append(Point("prefill", 1, length, min(times)))
    for ctx in contexts:
        for batch in batch_sizes:
            for _ in range(batch):
                engine.add_request(prompt(ctx), SamplingParams(max_tokens=decode_steps + 2, temperature=0.0,
                                                               ignore_eos=True))
            while any(s.num_output_tokens == 0 for s in engine.scheduler.running) or engine.scheduler.waiting:
                engine.step()
            points.append(Point("decode", batch, ctx, _fastest_step(engine, decode_steps)))
            while engine.has_unfinished_requests():
                engine.step()
    cfg_path = Path(model_dir) / "config.json"
    info = {
        "model_dir": str(model_dir), "model_config": json.loads(cfg_path.read_text()),
        "dtype_bytes": torch.empty((), dtype=engine.dtype).element_size(),
        "weight_bytes": engine.weight_bytes, "kv_block_bytes": engine.kv_cache.block_bytes,
        "block_size": engine.config.block_size, "device": str(engine.device),
        "engine": {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
                   "max_model_len": max_model_len, "threads": threads},
    }
    return points, info


COLUMNS = ("fixed", "seq_s", "token_s", "pair_s", "ctx_s")


def _features(p: Point) -> list[float]:
    if p.kind == "prefill":
        return [1.0, 1.0, float(p.tokens), p.tokens * (p.tokens + 1) / 2, 0.0]
    return [1.0, float(p.batch), float(p.batch), 0.0, float(p.batch * (p.tokens + 1))]


def nnls(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares with every coefficient >= 0 (active set: drop the most negative column, refit)."""
    a, y = np.asarray(rows, dtype=float), np.asarray(ys, dtype=float)
    active = list(range(a.shape[1]))
    while active:
        coef, *_ = np.linalg.lstsq(a[:, active], y, rcond=None)
        worst = int(np.argmin(coef))
        if coef[worst] >= 0:
            out = [0.0] * a.shape[1]
            for i, c in zip(active, coef, strict=True):
                out[i] = float(c)
            return out
        active.pop(worst)
    return [0.0] * a.shape[1]


def fit(points: Sequence[Point], layer_share: float = 0.8) -> StepCost:
    if len({p.kind for p in points}) < 2 or len(points) < len(COLUMNS):
        raise ValueError(f"need prefill and decode points, {len(COLUMNS)} at least")
    fixed, seq_s, token_s, pair_s, ctx_s = nnls([_features(p) for p in points], [p.seconds for p in points])
    return StepCost(base_s=fixed * (1 - layer_share), layer_base_s=fixed * layer_share, weights_s=0.0,
                    token_s=token_s, pair_s=pair_s, ctx_s=ctx_s, seq_s=seq_s, source="calibrated")


def predict(step: StepCost, p: Point) -> float:
    f = _features(p)
    return step.time(int(f[2]), f[3], int(f[4]), 1.0, int(f[1]))


def calibrate(model_dir: str, out: Path, *, prompt_lens: Sequence[int] = (16, 64, 160, 320, 480),
              batch_sizes: Sequence[int] = (1, 4, 16), contexts: Sequence[int] = (32, 512), reps: int = 3,
              decode_steps: int = 12, threads: int | None = None, max_num_seqs: int = 16,
              max_num_batched_tokens: int = 512, max_model_len: int = 2048, num_kv_blocks: int = 2048,
              layer_share: float = 0.8) -> dict[str, Any]:
    """Measure, fit, write the calibration JSON (what predict_local reads) and return it."""
    points, info = measure(model_dir, prompt_lens=prompt_lens, batch_sizes=batch_sizes, contexts=contexts,
                           reps=reps, decode_steps=decode_steps, threads=threads, max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                           num_kv_blocks=num_kv_blocks)
    step = fit(points, layer_share)
    doc = {
        **info, "layer_share": layer_share, "step_cost": step.to_dict(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "points": [{"kind": p.kind, "batch": p.batch, "tokens": p.tokens, "measured_s": p.seconds,
                    "predicted_s": predict(step, p), "error": predict(step, p) / p.seconds - 1} for p in points],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return doc
