"""Run a soak: start the cluster, learn the reference tokens, run the workload and the chaos schedule for the
duration, settle (every group restored, every request ended), check the invariants, print the report.

    python -m bench.soak --model .models/tiny --duration 1800 --seed 7 --out bench/results/soak.json
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai

from bench.soak.chaos import Chaos, ChaosRates, schedule
from bench.soak.cluster import POOL, Cluster
from bench.soak.invariants import (
    EpochMonitor,
    Report,
    check_memory,
    check_requests,
    check_serving_state,
    reference_tokens,
)
from bench.soak.workload import Kind, Workload, catalog


@dataclass(slots=True)
class SoakConfig:
    model: Path
    duration_s: float = 180.0
    seed: int = 7
    agents: int = 3
    clients: int = 3
    rates: ChaosRates = field(default_factory=ChaosRates)
    warmup_s: float = 30.0  # resident memory is judged after this
    quiet_tail_s: float = 10.0  # no chaos in the last seconds of the duration
    rss_limit_mib_per_min: float = 20.0
    workdir: Path | None = None
    out: Path | None = None
    agent_args: tuple[str, ...] = ("--num-kv-blocks", "256", "--max-num-batched-tokens", "256", "--rpc-timeout", "10")


def _say(line: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {line}", flush=True)


def warm_up(cluster: Cluster, model_name: str, cfg: SoakConfig) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """One greedy-or-seeded non-streaming request per template, before any chaos: the prompt ids the gateway
    made (chat template applied) and the tokens it returned."""
    client = openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key="soak", max_retries=0, timeout=120)
    prompts, tokens = {}, {}
    for t in catalog(cfg.seed):
        deadline = time.monotonic() + 120
        while True:
            try:
                if t.kind is Kind.CHAT:
                    resp: Any = client.chat.completions.create(
                        model=model_name, messages=[{"role": "user", "content": t.prompt}], **t.body())
                else:
                    resp = client.completions.create(model=model_name, prompt=t.prompt, **t.body())
                break
            except openai.APIError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        prompts[t.key] = list((resp.model_extra or {})["prompt_token_ids"])
        tokens[t.key] = list((resp.choices[0].model_extra or {})["token_ids"])
    client.close()
    return prompts, tokens


def settle(cluster: Cluster, chaos: Chaos, timeout_s: float = 180.0) -> list[str]:
    """Every process up, then every group the controller still has restored (bounded). Returns what it did."""
    done = []
    if not cluster.wait_all_up(timeout_s):
        done.append("not every process came back up")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = cluster.redis_client()
            groups = chaos._state(r).get("groups") or []
            if not groups:
                r.close()
                break
            for g in groups:
                done.append(f"restore {g['id']}: " + chaos._request(r, {"action": "Restore", "group": g["id"],
                                                                        "reason": "soak end"}))
            r.close()
        except Exception as exc:
            done.append(f"settle: {type(exc).__name__}: {exc}")
        time.sleep(2.0)
    return done


def run_soak(cfg: SoakConfig) -> Report:
    workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="kunserve-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(cfg.model, workdir, cfg.agents, cfg.agent_args, log=_say)
    report = Report()
    events = schedule(cfg.seed, cfg.duration_s, cfg.rates, cfg.quiet_tail_s)
    _say(f"seed {cfg.seed}, {cfg.duration_s:.0f} s, {cfg.agents} agents, {cfg.clients} clients, "
         f"{len(events)} chaos events; logs in {workdir}")
    chaos = Chaos(cluster, events, cfg.seed, workdir / "chaos.jsonl")
    monitor = EpochMonitor(cluster)
    model_name = cfg.model.name
    try:
        cluster.start()
        prompts, warm = warm_up(cluster, model_name, cfg)
        templates = catalog(cfg.seed)
        reference = reference_tokens(cfg.model, templates, prompts)
        diff = [k for k in warm if warm[k] != reference[k]]
        report.check("no chaos: gateway tokens == in-process engine", not diff, ", ".join(diff))
        workload = Workload(cluster.gateway_url, model_name, templates, cfg.seed, clients=cfg.clients)
        t0 = time.time()
        monitor.start()
        workload.start()
        chaos.start()
        next_line = t0 + 30
        while time.time() - t0 < cfg.duration_s:
            if _TERMINATED.wait(min(1.0, max(cfg.duration_s - (time.time() - t0), 0.1))):
                raise SystemExit(128 + signal.SIGTERM)
            if time.time() < next_line:
                continue
            next_line += 30
            _say(f"t={time.time() - t0:.0f}s requests {len(workload.outcomes)}, chaos {chaos.counts}, restarts "
                 f"{ {p.name: p.restarts for p in cluster.pods.values() if p.restarts} }")
        report.check("chaos schedule stopped by itself", chaos.stop())
        report.check("clients finished their requests", workload.stop())
        settled = settle(cluster, chaos)
        monitor.sample()
        monitor.stop()
        check_requests(report, workload.outcomes, reference)
        check_serving_state(report, cluster)
        report.check("epochs never went back (topology, each agent process)", not monitor.violations,
                     "; ".join(monitor.violations[:5]))
        check_memory(report, cluster, t0 + cfg.warmup_s, cfg.rss_limit_mib_per_min)
        report.facts.update({
            "seed": cfg.seed, "duration_s": cfg.duration_s, "requests (attempts)": len(workload.outcomes),
            "chaos events": chaos.counts, "chaos failures": sum(not e.ok for e in events if e.done_at_s is not None),
            "restarts": {p.name: p.restarts for p in cluster.pods.values()},
            "topology epochs": f"{monitor.topology_epochs[0] if monitor.topology_epochs else '?'} -> "
                               f"{monitor.topology_epochs[-1] if monitor.topology_epochs else '?'}",
            "settle": settled, "workdir": str(workdir)})
    finally:
        chaos.stop(5)
        monitor.stop()
        cluster.stop()
    print(report.text(), flush=True)
    if cfg.out is not None:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(json.dumps({"pool": POOL, "config": {**asdict(cfg), "model": str(cfg.model),
                                                                "workdir": str(workdir), "out": str(cfg.out)},
                                       "report": report.to_json(),
                                       "chaos": [{**asdict(e), "kind": e.kind.value} for e in events]},
                                      indent=1, default=str))
    return report


_TERMINATED = threading.Event()


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: run_soak's finally stops every process it started.
    The flag catches the case where the exception lands in a callback that swallows it (a weakref's)."""
    _TERMINATED.set()
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description="mixed load + chaos + invariant report")
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory (e.g. .models/tiny)")
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load and chaos")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--drop-rate", type=float, default=3.0, help="drops per minute")
    p.add_argument("--restore-rate", type=float, default=3.0, help="restores per minute")
    p.add_argument("--kill-rate", type=float, default=1.0, help="agent SIGKILLs per minute")
    p.add_argument("--redis-rate", type=float, default=0.5, help="Redis restarts per minute")
    p.add_argument("--controller-rate", type=float, default=0.5, help="controller restarts per minute")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds before resident memory is judged")
    p.add_argument("--rss-limit", type=float, default=20.0, help="largest VmRSS slope accepted, MiB/min")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--out", type=Path, help="write the report and the chaos log here (JSON)")
    a = p.parse_args(argv)
    if not (a.model / "config.json").is_file():
        p.error(f"{a.model}: no checkpoint there (config.json); write the seeded tiny one with "
                f"`kunserve make-model {a.model} --preset tiny`, or run `make soak`")
    signal.signal(signal.SIGTERM, _on_sigterm)
    rates = ChaosRates(a.drop_rate, a.restore_rate, a.kill_rate, a.redis_rate, a.controller_rate)
    cfg = SoakConfig(model=a.model.resolve(), duration_s=a.duration, seed=a.seed, agents=a.agents, clients=a.clients,
                     rates=rates, warmup_s=a.warmup, rss_limit_mib_per_min=a.rss_limit, workdir=a.workdir,
                     out=a.out)
    return 0 if run_soak(cfg).ok else 1
