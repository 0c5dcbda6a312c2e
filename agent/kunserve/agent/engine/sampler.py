"""Token sampling: greedy, temperature, top-k, top-p, and per-request seeds.

Random draws use the exponential race (argmax of p / q with q ~ Exp(1)), which equals sampling from p.
A seeded request draws q from a generator seeded by (seed, output index), so its tokens do not depend
on what else is in the batch, on preemption, or on which process samples the step.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from kunserve.agent.engine.sequence import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant to decorrelate (seed, step) pairs
_MASK64 = (1 << 64) - 1


def step_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed for output token `step` of a request seeded with `seed`."""
    x = (seed ^ ((step + 1) * _MIX)) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


class Sampler:
    def __init__(self, device: torch.device, seed: int | None = None) -> None:
        self.device = device
        self._generator = torch.Generator(device=device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)
        self._seeded = torch.Generator(device=device)

    def __call__(self, logits: torch.Tensor, params: Seq[SamplingParams], steps: Seq[int]) -> list[int]:
        """logits: [S, V] fp32, one row per sampling request; steps: output index being sampled."""
        out = logits.argmax(dim=-1)  # [S] — greedy rows are done
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            idx = torch.tensor(rows, device=logits.device)
            probs = self._probs(logits[idx], [params[i] for i in rows])  # [R, V]
            q = torch.empty_like(probs)
            for j, i in enumerate(rows):
                seed = params[i].seed
                if seed is None:
                    q[j].exponential_(generator=self._generator)
                else:
                    self._seeded.manual_seed(step_seed(seed, steps[i]))
                    q[j].exponential_(generator=self._seeded)
            out[idx] = probs.div_(q).argmax(dim=-1)
        return [int(t) for t in out.tolist()]

    @staticmethod
    def _probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature, then top-k and top-p filtering -> probabilities [R, V]."""
        temps = torch.tensor([p.temperature for p in params], device=logits.device).unsqueeze(1)
        logits = logits / temps
        top_ks = [p.top_k for p in params]
        if any(0 < k < logits.shape[1] for k in top_ks):
            ks = torch.tensor([k if 0 < k < logits.shape[1] else logits.shape[1] for k in top_ks], device=logits.device)
            kth = logits.sort(dim=-1, descending=True).values.gather(1, (ks - 1).unsqueeze(1))  # [R, 1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        top_ps = [p.top_p for p in params]
        if any(p < 1.0 for p in top_ps):
            sorted_p, order = probs.sort(dim=-1, descending=True)
            cum = sorted_p.cumsum(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = (cum - sorted_p) >= torch.tensor(top_ps, device=logits.device).unsqueeze(1)
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs
