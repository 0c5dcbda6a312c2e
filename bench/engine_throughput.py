"""Engine throughput: KunServe's engine against HF transformers generate on the same checkpoint.

Measures tokens/s at each batch size (same prompt per row, fixed number of new tokens, eos ignored,
end-to-end including prefill), the measured memory bandwidth, and the batch-1 decode roofline
(resident weight bytes / bandwidth). Prints a table and writes JSON. Never asserts a timing.

    python bench/engine_throughput.py --model .models/smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kunserve.agent.engine.config import EngineConfig
from kunserve.agent.engine.llm_engine import LLMEngine
from kunserve.agent.engine.sequence import SamplingParams

PROMPT = "Write a short story about a lighthouse keeper who discovers a message in a bottle."


@dataclass(slots=True)
class Row:
    system: str
    batch: int
    new_tokens: int
    seconds: float  # median over repeats
    tokens_per_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device, mib: int = 512, repeats: int = 5) -> dict[str, float]:
    """GB/s for reading a buffer (sum) and for copying it (bytes copied / time), best of `repeats`."""
    n = mib * 1024 * 1024 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    read, copy = [], []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        src.sum()
        _sync(device)
        read.append(time.perf_counter() - t)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        copy.append(time.perf_counter() - t)
    nbytes = n * 4
    return {"read_gb_s": nbytes / min(read) / 1e9, "copy_gb_s": nbytes / min(copy) / 1e9}


def bench_engine(engine: LLMEngine, prompt_ids: list[int], batch: int, new_tokens: int, repeats: int) -> Row:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.generate([prompt_ids] * batch, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    times = []
    for _ in range(repeats):
        _sync(engine.device)
        t = time.perf_counter()
        outs = engine.generate([prompt_ids] * batch, params)
        _sync(engine.device)
        times.append(time.perf_counter() - t)
        assert all(len(o.token_ids) == new_tokens for o in outs)
    sec = statistics.median(times)
    return Row("kunserve", batch, new_tokens, sec, batch * new_tokens / sec)


def bench_hf(model_dir: str, device: torch.device, prompt_ids: list[int], batch: int, new_tokens: int,
             repeats: int) -> Row:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = model.to(device).eval()  # type: ignore[arg-type]
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = torch.tensor([prompt_ids] * batch, device=device)
    times = []
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            _sync(device)
            times.append(time.perf_counter() - t)
            assert out.shape[1] == len(prompt_ids) + new_tokens
    sec = statistics.median(times)
    return Row("hf-transformers", batch, new_tokens, sec, batch * new_tokens / sec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for both systems")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", default="bench/results/engine_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    device = EngineConfig(model=args.model, device=args.device).resolve_device()
    bw = measure_bandwidth(device)
    rows = []
    weight_bytes, prompt_ids = 0, []
    for b in batches:
        # One engine per batch size, configured for it (max_num_seqs = batch): with weight_layout "auto" a
        # batch-1 engine on CPU stores its wide projections input-major, as a latency-bound deployment would.
        engine = LLMEngine(EngineConfig(model=args.model, device=args.device, progress=False, max_num_seqs=b,
                                        torch_threads=args.threads))
        weight_bytes = engine.weight_bytes
        prompt_ids = engine.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
        rows.append(bench_engine(engine, prompt_ids, b, args.new_tokens, args.repeats))
        rows[-1].system += f" ({'input' if engine.model.input_major else 'output'}-major)"
        print(f"kunserve batch {b}: {rows[-1].tokens_per_s:.1f} tokens/s", flush=True)
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    roofline = bw["read_gb_s"] * 1e9 / weight_bytes
    copy_roofline = bw["copy_gb_s"] * 1e9 / weight_bytes
    if not args.skip_hf:
        for b in batches:
            rows.append(bench_hf(args.model, device, prompt_ids, b, args.new_tokens, args.repeats))
            print(f"hf batch {b}: {rows[-1].tokens_per_s:.1f} tokens/s", flush=True)
    by = {(r.system.split(" ")[0], r.batch): r.tokens_per_s for r in rows}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"\nmodel {args.model}  device {device} ({device_name})  threads {args.threads}  "
          f"weights {weight_bytes / 1e6:.0f} MB  read bandwidth {bw['read_gb_s']:.2f} GB/s  "
          f"copy bandwidth {bw['copy_gb_s']:.2f} GB/s")
    print(f"{'batch':>5} {'kunserve tok/s':>15} {'HF tok/s':>10} {'ratio':>7} {'% of roofline':>14}")
    for b in batches:
        ours, hf = by[("kunserve", b)], by.get(("hf-transformers", b))
        ratio = f"{ours / hf:.2f}x" if hf else "-"
        roof = f"{100 * ours / roofline:.0f}%" if b == 1 else ""
        print(f"{b:>5} {ours:>15.1f} {hf or 0:>10.1f} {ratio:>7} {roof:>14}")
    print(f"batch-1 decode roofline (weights / read bandwidth): {roofline:.1f} tokens/s")
    if ("kunserve", 1) in by:
        print(f"with the copy bandwidth instead: {copy_roofline:.1f} tokens/s; "
              f"batch 1 at {100 * by[('kunserve', 1)] / copy_roofline:.0f}% of it")
    result = {
        "model": args.model, "device": str(device), "device_name": device_name, "threads": args.threads,
        "new_tokens": args.new_tokens, "prompt_tokens": len(prompt_ids), "weight_bytes": weight_bytes,
        "bandwidth": bw, "roofline_tokens_per_s": roofline, "copy_roofline_tokens_per_s": copy_roofline,
        "rows": [asdict(r) for r in rows],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
