"""Where a decode step's time goes: torch.profiler over steady-state decode steps at one batch size.

Prints the step time and the top operators by self CPU time per step (matrix products, attention, ...).
Never asserts a timing.

    python bench/profile_step.py --model .models/smollm2-135m --batch 16
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kunserve.agent.engine.config import EngineConfig
from kunserve.agent.engine.llm_engine import LLMEngine
from kunserve.agent.engine.sequence import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=50)
    ap.add_argument("--warmup-steps", type=int, default=60, help="decode steps before measuring")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--weight-layout", default="auto", choices=["auto", "input-major", "output-major"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(model=args.model, progress=False, max_num_seqs=args.batch,
                                    torch_threads=args.threads, weight_layout=args.weight_layout))
    params = SamplingParams(max_tokens=args.warmup_steps + 2 * args.steps + 8, temperature=0.0, ignore_eos=True)
    for _ in range(args.batch):
        engine.add_request(list(range(100, 100 + args.prompt_tokens)), params)
    for _ in range(args.warmup_steps):
        engine.step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    step_ms = (time.perf_counter() - t0) / args.steps * 1000
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            engine.step()
    layout = "input-major" if engine.model.input_major else "output-major"
    print(f"batch {args.batch}, {layout} weights, {args.threads} threads: {step_ms:.1f} ms per decode step "
          f"({args.batch * 1000 / step_ms:.1f} tokens/s)")
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    print(f"{'operator':<52} {'ms/step':>8} {'calls/step':>10}")
    for e in events:
        print(f"{e.key[:52]:<52} {e.self_cpu_time_total / 1000 / args.steps:>8.2f} {e.count // args.steps:>10}")


if __name__ == "__main__":
    main()
