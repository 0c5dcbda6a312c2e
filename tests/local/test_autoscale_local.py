"""Local mode bridges a scale-out's cold start with a drop, on real processes (tiny model, real redis-server,
gateway, agents): a burst arrives, the pool drops within one control period and starts a third agent in the
same round; the agent takes several seconds (a start-up delay, then its weight load) before it serves; once
it does, the group restores. Every request of the burst completes with the tokens an in-process engine
produces for it (greedy, ignore_eos): nothing lost, nothing changed."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest

from kunserve.agent.engine.config import EngineConfig
from kunserve.agent.engine.llm_engine import LLMEngine
from kunserve.agent.engine.sequence import SamplingParams
from kunserve.operator.local import LocalController, LocalOptions, LocalPool, load_pool
from kunserve.operator.plan_types import ReplicaPressure
from kunserve.operator.reconfig import Action

pytestmark = pytest.mark.timeout(150)
PLAN_S = 0.5
STARTUP_DELAY_S = 4.0
# The burst: SPIKE requests at once (their KV is 2.3x the two replicas' pools: a queue at any CPU speed), then
# TAIL_RATE requests/s until the new replica has served for TAIL_AFTER_S (at most MAX_TAIL_S): enough to keep
# demand above the cancel threshold until the new replica is Ready, on a fast machine too.
SPIKE, TAIL_RATE, TAIL_AFTER_S, MAX_TAIL_S, PROMPT, MAX_TOKENS = 24, 6.0, 3.0, 45.0, 40, 160
POOL = """\
apiVersion: kunserve.io/v1alpha1
kind: ServingPool
metadata:
  name: burst
spec:
  model: {{name: tiny, path: {path}}}
  replicas: 2
  elasticity: {{maxGroupSize: 2, dropDemand: 0.9, restoreDemand: 0.5, restoreWindowSeconds: 3600}}
  autoscaling: {{minReplicas: 2, maxReplicas: 3, targetDemand: 0.6, scaleDownStabilizationSeconds: 3600}}
  engine: {{maxNumSeqs: 64, maxModelLen: 256, maxNumBatchedTokens: 256, memoryBudgetBytes: 24000000}}
"""


def prompt(i: int) -> list[int]:
    return [3 + (i * 7 + j * 13) % 400 for j in range(PROMPT)]


def reference(model: Path, n: int) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model=str(model), num_kv_blocks=2048, progress=False, torch_threads=1))
    outs = engine.generate([prompt(i) for i in range(n)],
                           SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    return [list(o.token_ids) for o in outs]


async def complete(client: aiohttp.ClientSession, url: str, prompt: list[int]) -> list[int]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    async with client.post(f"{url}/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        return list((await response.json())["choices"][0]["token_ids"])


def record_rounds(ctl: LocalController, rounds: list[tuple[float, bool]]) -> None:
    """Each controller round reads the collector's snapshot once: record when, and whether it showed a replica
    at drop demand with a queue (rounds, not seconds: a loaded machine delays rounds, not their order)."""
    snapshot = ctl.collector.snapshot

    def recorded() -> list[ReplicaPressure]:
        pressures = snapshot()
        rounds.append((ctl.clock(), any(p.demand >= 0.9 and p.num_waiting > 0 for p in pressures)))
        return pressures

    ctl.collector.snapshot = recorded  # type: ignore[method-assign]


def test_a_burst_drops_scales_out_and_restores_when_the_new_replica_serves(tiny_dir: Path, tmp_path: Path) -> None:
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text(POOL.format(path=tiny_dir))
    options = LocalOptions(pool_file=pool_file, port=0, threads=1, workdir=tmp_path / "work", plan_interval_s=PLAN_S,
                           pressure_interval_ms=100, startup_delay_s=STARTUP_DELAY_S, start_timeout_s=120)
    lines: list[str] = []
    rounds: list[tuple[float, bool]] = []
    local = LocalPool(load_pool(pool_file), options, out=lines.append)

    async def scenario() -> list[list[int]]:
        stop = asyncio.Event()
        serving = asyncio.create_task(local.serve(stop))
        try:
            while not local.serving.is_set():
                assert not serving.done(), "\n".join(lines)
                await asyncio.sleep(0.05)
            ctl = local.ctl
            assert ctl is not None
            record_rounds(ctl, rounds)

            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=150)) as client:
                calls = [asyncio.create_task(complete(client, local.gateway_url, prompt(i))) for i in range(SPIKE)]
                start = time.time()
                while time.time() - start < MAX_TAIL_S:
                    served = [e.at for e in ctl.events if e.kind == "AgentServing"]
                    if served and time.time() - served[0] >= TAIL_AFTER_S:
                        break
                    await asyncio.sleep(1 / TAIL_RATE)
                    calls.append(asyncio.create_task(complete(client, local.gateway_url, prompt(len(calls)))))
                outputs = list(await asyncio.gather(*calls))
                # The burst is over: let the pool settle (the restore may still be running).
                for _ in range(200):
                    if any(e.kind == "Restore" for e in local.ctl.events):
                        break
                    await asyncio.sleep(0.1)
            return outputs
        finally:
            stop.set()
            assert await asyncio.wait_for(serving, 60) == 0, "\n".join(lines)

    outputs = asyncio.run(scenario())
    assert outputs == reference(tiny_dir, len(outputs)), "a request's tokens changed"
    ctl = local.ctl
    assert ctl is not None
    kinds = [e.kind for e in ctl.events]
    log = "\n".join(f"{e.at:.2f} {e.kind} {e.detail}" for e in ctl.events) + "\n" + "\n".join(lines)
    assert {"ScaleUp", "Drop", "AgentServing", "ScaleUpReady", "Restore"} <= set(kinds), log
    # The drop starts in the first round that sees the pressure; the scale-out is asked for no later than that.
    drop_log = next(h for h in ctl.history if h.spec.action is Action.DROP)
    started = drop_log.record.started_at
    assert started is not None and drop_log.record.phase.value == "Completed", log
    pressured_before = [t for t, pressured in rounds if pressured and t <= started]
    assert len(pressured_before) == 1, f"the drop started after {len(pressured_before)} rounds saw pressure\n{log}"
    up = next(e for e in ctl.events if e.kind == "ScaleUp")
    assert up.at <= started + 0.05, log
    # The new agent serves only after its start-up delay (plus its weight load); then the group restores.
    serving_at = next(e.at for e in ctl.events if e.kind == "AgentServing" and e.detail == "burst-agent-2")
    ready = next(e for e in ctl.events if e.kind == "ScaleUpReady")
    restore_log = next(h for h in ctl.history if h.spec.action is Action.RESTORE)
    assert restore_log.record.phase.value == "Completed", log
    assert up.at + STARTUP_DELAY_S <= serving_at <= ready.at <= (restore_log.record.started_at or 0), log
    assert "scale-out bridged" in restore_log.spec.reason, log
    assert ctl.groups == () and set(ctl.endpoints) == {f"burst-agent-{i}" for i in range(3)}
    children = json.loads((tmp_path / "work" / "processes.json").read_text())
    assert "burst-agent-2" in children
    assert ctl.signals is not None and ctl.signals.replicas == 3
