"""`kunserve generate`: run the engine in-process on one prompt and print the completion."""

from __future__ import annotations

import argparse
import json
import sys
import time

from kunserve.agent.errors import KunServeError


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (HF format: config.json, safetensors)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-token-ids", type=_token_ids, help="prompt as comma-separated token ids")
    p.add_argument("--chat", action="store_true", help="wrap --prompt as a user message in the chat template")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="per-request seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (keep float32 on CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def run(args: argparse.Namespace) -> int:
    from kunserve.agent.engine.config import EngineConfig
    from kunserve.agent.engine.llm_engine import LLMEngine
    from kunserve.agent.engine.sequence import SamplingParams

    try:
        t_load = time.perf_counter()
        engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                                        torch_threads=args.threads, progress=not args.json, max_num_seqs=1))
        load_s = time.perf_counter() - t_load
        prompt: str | list[int] = args.prompt_token_ids if args.prompt is None else args.prompt
        if args.chat:
            if args.prompt is None:
                print("error: --chat needs --prompt", file=sys.stderr)
                return 2
            prompt = engine.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
        t0 = time.perf_counter()
        engine.add_request(prompt, params, request_id="cli")
        final = None
        while final is None:
            for out in engine.step():
                if not args.json and out.new_text:
                    print(out.new_text, end="", flush=True)
                if out.finished:
                    final = out
        elapsed = time.perf_counter() - t0
    except KunServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    n = len(final.token_ids)
    ttft = final.ttft_s or 0.0
    decode_s = elapsed - ttft
    tps = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
    if args.json:
        print(json.dumps({
            "prompt_token_ids": final.prompt_token_ids, "token_ids": final.token_ids, "text": final.text,
            "finish_reason": final.finish_reason.value if final.finish_reason else None,
            "ttft_s": round(ttft, 6), "tokens_per_s": round(tps, 3),
        }))
    else:
        reason = final.finish_reason.value if final.finish_reason else "?"
        print(f"\n\n[{n} tokens, finish={reason}, load {load_s:.1f} s, TTFT {ttft * 1000:.0f} ms, "
              f"decode {tps:.1f} tokens/s on {engine.device}]", file=sys.stderr)
    return 0
