"""Helpers shared by the fidelity tests: run the engine with requests arriving staggered into a running
batch and capture every sampled step's logits; run HF transformers on the same prompts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from kunserve.agent.engine.llm_engine import LLMEngine
from kunserve.agent.engine.scheduler import ScheduledBatch
from kunserve.agent.engine.sequence import SamplingParams, Sequence


@dataclass
class Trace:
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # [V] per sampled step
    chunk_sizes: list[int] = field(default_factory=list)  # new tokens per step


def run_staggered(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, every: int = 2) -> list[Trace]:
    """Add prompt i at step i * every while earlier requests are running; run all to completion."""
    traces = {f"p{i}": Trace() for i in range(len(prompts))}
    execute = engine.runner.execute

    def capture(batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            traces[seq.request_id].chunk_sizes.append(n)
        seqs, logits = execute(batch)
        for seq, row in zip(seqs, logits, strict=True):
            traces[seq.request_id].logits.append(row.cpu())
        return seqs, logits

    engine.runner.execute = capture  # type: ignore[method-assign]
    try:
        step, added, finished = 0, 0, 0
        while finished < len(prompts):
            if added < len(prompts) and step % every == 0:
                engine.add_request(prompts[added], params, request_id=f"p{added}")
                added += 1
            for out in engine.step():
                if out.finished:
                    traces[out.request_id].tokens = out.token_ids
                    finished += 1
            step += 1
    finally:
        engine.runner.execute = execute  # type: ignore[method-assign]
    return [traces[f"p{i}"] for i in range(len(prompts))]


def hf_greedy(
    model_dir: Path, prompts: list[list[int]], new_tokens: int, device: str = "cpu"
) -> list[tuple[list[int], list[torch.Tensor]]]:
    """Greedy continuations and per-step logits from transformers' LlamaForCausalLM (eos disabled)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    out = []
    with torch.inference_mode():
        for ids in prompts:
            r = model.generate(
                torch.tensor([ids], device=device), max_new_tokens=new_tokens, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
            )
            out.append((r.sequences[0, len(ids):].tolist(), [step[0].float().cpu() for step in r.logits]))
    return out


def assert_matches(traces: list[Trace], reference: list[tuple[list[int], list[torch.Tensor]]], atol: float) -> float:
    """Token-identical, and logits within atol at every step. Returns the largest logit difference."""
    worst = 0.0
    for i, (trace, (ref_tokens, ref_logits)) in enumerate(zip(traces, reference, strict=True)):
        assert trace.tokens == ref_tokens, f"prompt {i}: tokens differ from transformers"
        assert len(trace.logits) == len(ref_logits)
        for step, (ours, theirs) in enumerate(zip(trace.logits, ref_logits, strict=True)):
            diff = (ours - theirs).abs().max().item()
            assert diff <= atol, f"prompt {i} step {step}: logits differ by {diff:.3g} > {atol}"
            worst = max(worst, diff)
    return worst
