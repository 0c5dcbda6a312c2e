"""KunServe pool simulator: the operator's real planner and the agent's real scheduler, in simulated time.

    python -m bench.sim run --gpu h100 --model llama3-70b --instances 8 --trace burstgpt --seed 0
    python -m bench.sim grid --duration 60            # every model x trace, the paper-style figure
    python -m bench.sim calibrate --model .models/tiny --out bench/results/sim/calibration-tiny.json
    python -m bench.sim local --calibration bench/results/sim/calibration-tiny.json

`run` prints TTFT / TPOT tables (p50 / p90 / p99) and where the tail's TTFT goes, and writes
bench/results/sim/<tag>.json and .png. Benchmarks never assert a timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python bench/sim/run.py): make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sim.hardware import GPUS, MODELS, SimConfigError, gpu_deployment
from bench.sim.metrics import Summary, breakdown_table, summarize, table
from bench.sim.simulator import SimConfig, SimResult, simulate
from bench.sim.state import Policy
from bench.sim.traces import (
    TraceKind,
    TraceRequest,
    TraceSpec,
    describe,
    generate,
    load_burstgpt_csv,
)
from kunserve.operator.plan_types import PoolSpec

RESULTS = Path("bench/results/sim")
# Default base load per model (requests/s per instance), chosen so that the default burst (4x for 20 s) with
# the default long answers (--output-scale 4) overloads KV memory on the default deployment (13B: A100 x1,
# 70B: H100 x4). With the traces' own lengths (--output-scale 1) pass --rate: compute binds first there.
BASE_RATE_PER_INSTANCE = {"llama2-13b": 0.5, "llama3-70b": 3.75}


def _policies(text: str) -> list[Policy]:
    try:
        return [Policy(p.strip()) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; policies: {', '.join(p.value for p in Policy)}") from exc


def add_trace_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trace")
    g.add_argument("--trace", type=TraceKind, default=TraceKind.BURSTGPT, choices=list(TraceKind))
    g.add_argument("--trace-csv", type=Path, help="replay a trace CSV in BurstGPT's columns instead")
    g.add_argument("--csv-start", type=float, default=0.0, help="CSV: first Timestamp to keep (s)")
    g.add_argument("--csv-speedup", type=float, default=1.0, help="CSV: replay this many times faster")
    g.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    g.add_argument("--rate", type=float, help="base requests/s for the whole pool (default: per model)")
    g.add_argument("--burst-factor", type=float, default=4.0)
    g.add_argument("--burst-start", type=float, default=20.0)
    g.add_argument("--burst-len", type=float, default=20.0)
    g.add_argument("--cv", type=float, help="inter-arrival CV (default: per trace kind)")
    g.add_argument("--output-scale", type=float, default=4.0,
                   help="multiply output lengths (long, chain-of-thought-like answers; 1 = the trace's own)")
    g.add_argument("--seed", type=int, default=0)


def add_pool_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pool")
    g.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    g.add_argument("--model", choices=sorted(MODELS), default="llama3-70b")
    g.add_argument("--tp", type=int, help="GPUs per instance (default: per model)")
    g.add_argument("--instances", type=int, default=8)
    g.add_argument("--policies", type=_policies, default=list(Policy), help="comma-separated")
    g.add_argument("--max-group-size", type=int, default=4)
    g.add_argument("--restore-window", type=float, default=10.0)
    g.add_argument("--plan-interval", type=float, default=0.5)
    g.add_argument("--group-limits", choices=["pooled", "leader"], default="pooled")
    g.add_argument("--exchange", choices=["bulk", "held"], default="bulk")
    g.add_argument("--depth", type=int, default=2, help="micro-batches in flight in a group")


def trace_requests(args: argparse.Namespace, instances: int, model: str) -> tuple[list[TraceRequest], str]:
    if args.trace_csv is not None:
        reqs = load_burstgpt_csv(args.trace_csv, start_s=args.csv_start, duration_s=args.duration * args.csv_speedup,
                                 time_scale=args.csv_speedup)
        return reqs, f"csv-{args.trace_csv.stem}"
    rate = args.rate if args.rate is not None else BASE_RATE_PER_INSTANCE.get(model, 1.0) * instances
    spec = TraceSpec(kind=args.trace, duration_s=args.duration, base_rate=rate, burst_factor=args.burst_factor,
                     burst_start_s=args.burst_start, burst_len_s=args.burst_len, cv=args.cv, seed=args.seed,
                     output_scale=args.output_scale)
    return generate(spec), str(args.trace.value)


def run_case(args: argparse.Namespace, model: str, requests: list[TraceRequest]) -> list[SimResult]:
    from bench.sim.coop import CoopSettings, ExchangeMode, GroupLimits

    dep = gpu_deployment(args.gpu, model, args.tp)
    pool = PoolSpec(restore_window_s=args.restore_window, max_group_size=args.max_group_size)
    coop = CoopSettings(depth=args.depth, limits=GroupLimits(args.group_limits), exchange=ExchangeMode(args.exchange))
    out = []
    for policy in args.policies:
        cfg = SimConfig(dep, policy, instances=args.instances, pool=pool, plan_interval_s=args.plan_interval,
                        coop=coop)
        res = simulate(requests, cfg)
        print(f"  {policy}: simulated {res.end_s:.0f} s in {res.wall_s:.1f} s, {res.unfinished} unfinished",
              file=sys.stderr)
        out.append(res)
    return out


def _meta(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    return {"command": "python -m bench.sim " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": {"platform": platform.platform(), "python": platform.python_version()},
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}}


def _dump(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"wrote {path}")


def cmd_run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from bench.sim.plots import plot_run

    requests, trace = trace_requests(args, args.instances, args.model)
    dep = gpu_deployment(args.gpu, args.model, args.tp)
    print(f"{dep.name} x {args.instances}, {trace}: {describe(requests)}")
    results = run_case(args, args.model, requests)
    sums = [summarize(r) for r in results]
    print(table(sums), "\n", breakdown_table(sums), sep="\n")
    tag = args.tag or f"{args.model}-{args.gpu}-x{args.instances}-{trace}-s{args.seed}"
    doc = {**_meta(args, argv), "deployment": dep.name, "step_cost": dep.step.to_dict(), "links": dep.links.source,
           "kv_blocks_per_instance": dep.kv_blocks, "trace": describe(requests),
           "summaries": [s.to_dict() for s in sums], "reconfigs": {str(r.policy): r.reconfigs for r in results}}
    _dump(args.out / f"{tag}.json", doc)
    plot_run(results, args.out / f"{tag}.png", f"{dep.name} x {args.instances}, {trace} (seed {args.seed})")
    print(f"wrote {args.out / f'{tag}.png'}")
    return 0


def cmd_grid(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from bench.sim.plots import plot_grid

    cases: dict[str, list[Summary]] = {}
    for model in args.models.split(","):
        for kind in args.traces.split(","):
            args.trace, args.model = TraceKind(kind), model
            requests, trace = trace_requests(args, args.instances, model)
            label = f"{model} / {trace}"
            print(f"{label}: {describe(requests)}", file=sys.stderr)
            cases[label] = [summarize(r) for r in run_case(args, model, requests)]
            print(f"\n### {label}\n\n{table(cases[label])}\n")
    tag = args.tag or f"grid-{args.gpu}-x{args.instances}-s{args.seed}"
    _dump(args.out / f"{tag}.json", {**_meta(args, argv),
                                     "cases": {k: [s.to_dict() for s in v] for k, v in cases.items()}})
    plot_grid(cases, args.out / f"{tag}.png", f"{args.gpu} x {args.instances} instances, seed {args.seed}")
    print(f"wrote {args.out / f'{tag}.png'}")
    return 0


def cmd_calibrate(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from bench.sim.calibrate import calibrate

    doc = calibrate(args.model, args.out, threads=args.threads, reps=args.reps,
                    prompt_lens=[int(x) for x in args.prompt_lens.split(",")],
                    batch_sizes=[int(x) for x in args.batch_sizes.split(",")],
                    contexts=[int(x) for x in args.contexts.split(",")])
    print(json.dumps(doc["step_cost"], indent=1))
    for p in doc["points"]:
        print(f"{p['kind']:8} batch {p['batch']:3} tokens {p['tokens']:5}: measured {p['measured_s'] * 1e3:8.2f} ms, "
              f"fit {p['predicted_s'] * 1e3:8.2f} ms ({p['error']:+.0%})")
    print(f"wrote {args.out}")
    return 0


def cmd_local(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from bench.sim.local import LocalSetup, predict_local

    spec = TraceSpec(kind=args.trace, duration_s=args.duration, base_rate=args.rate, burst_factor=args.burst_factor,
                     burst_start_s=args.burst_start, burst_len_s=args.burst_len, cv=args.cv, seed=args.seed,
                     max_prompt=args.max_prompt, max_output=args.max_output, output_scale=args.output_scale)
    requests = generate(spec)
    pool = PoolSpec(drop_demand=args.drop_demand, restore_demand=args.restore_demand,
                    restore_window_s=args.restore_window, max_group_size=args.group_size)
    setup = LocalSetup(replicas=args.replicas, num_kv_blocks=args.kv_blocks, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_batched_tokens, max_model_len=args.max_model_len,
                       threads_per_agent=args.threads, cpu_cores=args.cores, pool=pool)
    pred = predict_local(args.calibration, requests, setup, args.policies)
    print(f"{pred.deployment.name} x {args.replicas}: {pred.deployment.kv_blocks} KV blocks each; {describe(requests)}")
    sums = list(pred.summaries.values())
    print(table(sums), "\n", breakdown_table(sums), sep="\n")
    tag = args.tag or f"local-{Path(args.calibration).stem}-s{args.seed}"
    _dump(args.out / f"{tag}.json", {**_meta(args, argv), **pred.to_dict()})
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.sim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="one deployment, one trace, every policy")
    add_pool_args(run)
    add_trace_args(run)
    run.add_argument("--out", type=Path, default=RESULTS)
    run.add_argument("--tag", help="output file stem")
    run.set_defaults(func=cmd_run)
    grid = sub.add_parser("grid", help="models x traces x policies (the paper-style figure)")
    add_pool_args(grid)
    add_trace_args(grid)
    grid.add_argument("--models", default="llama2-13b,llama3-70b")
    grid.add_argument("--traces", default=",".join(k.value for k in TraceKind))
    grid.add_argument("--out", type=Path, default=RESULTS)
    grid.add_argument("--tag")
    grid.set_defaults(func=cmd_grid)
    cal = sub.add_parser("calibrate", help="fit step costs from the real engine on this device")
    cal.add_argument("--model", required=True, help="checkpoint directory (e.g. .models/tiny)")
    cal.add_argument("--out", type=Path, required=True)
    cal.add_argument("--threads", type=int, default=1)
    cal.add_argument("--reps", type=int, default=5)
    cal.add_argument("--prompt-lens", default="16,64,160,320,480")
    cal.add_argument("--batch-sizes", default="1,4,16")
    cal.add_argument("--contexts", default="32,512")
    cal.set_defaults(func=cmd_calibrate)
    loc = sub.add_parser("local", help="predict the local N-agent CPU setup from a calibration")
    loc.add_argument("--calibration", type=Path, required=True)
    loc.add_argument("--replicas", type=int, default=4)
    loc.add_argument("--kv-blocks", type=int, help="KV blocks per agent (default: from the 1 GiB budget)")
    loc.add_argument("--max-num-seqs", type=int, default=16)
    loc.add_argument("--max-batched-tokens", type=int, default=512)
    loc.add_argument("--max-model-len", type=int, default=2048)
    loc.add_argument("--threads", type=float, default=1.0, help="torch threads per agent")
    loc.add_argument("--cores", type=float, default=2.0, help="cores the agents share")
    loc.add_argument("--drop-demand", type=float, default=0.9)
    loc.add_argument("--restore-demand", type=float, default=0.5)
    loc.add_argument("--restore-window", type=float, default=30.0)
    loc.add_argument("--group-size", type=int, default=4)
    loc.add_argument("--policies", type=_policies, default=[Policy.KUNSERVE, Policy.VLLM])
    add_trace_args(loc)
    loc.set_defaults(rate=2.0, duration=60.0, output_scale=1.0)
    loc.add_argument("--max-prompt", type=int, default=512)
    loc.add_argument("--max-output", type=int, default=256)
    loc.add_argument("--out", type=Path, default=RESULTS)
    loc.add_argument("--tag")
    loc.set_defaults(func=cmd_local)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args, argv))
    except SimConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
