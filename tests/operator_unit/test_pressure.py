"""The pressure collector against fake agents: the planner's view of each agent, reconnecting after an agent
restarts, stale marking, groups, and bounded shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from kunserve.operator.executor import ExecutorSettings, drop_group
from kunserve.operator.plan_types import ReplicaPressure
from kunserve.operator.planner import group_id_for
from kunserve.operator.pressure import PressureCollector
from tests.operator_unit.fake_agent import FakeCluster, FakeLoad


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(scenario(), 30))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def by_name(pressures: list[ReplicaPressure]) -> dict[str, ReplicaPressure]:
    return {p.name: p for p in pressures}


def test_the_snapshot_is_the_planners_view_of_every_agent() -> None:
    async def scenario() -> None:
        cluster = FakeCluster()
        a, b = cluster.add("agent-0"), cluster.add("agent-1", model="other")
        await cluster.start_all(a, b)
        a.load = FakeLoad(blocks_needed=150, num_waiting=3, num_running=4)
        try:
            async with PressureCollector(interval_ms=20, stale_after_s=5) as c:
                c.set_targets({"agent-0": a.endpoint, "agent-1": b.endpoint})
                got = await c.wait_until(lambda c: len(c.snapshot()) == 2 and c.snapshot(), 10)
                assert by_name(got)["agent-0"] == ReplicaPressure(
                    name="agent-0", model="tiny", blocks_needed=150, blocks_total=100, num_waiting=3, num_running=4,
                    kv_pool_bytes=8000, stale=False, group=None, home_blocks_needed=150)
                assert by_name(got)["agent-1"].model == "other" and by_name(got)["agent-1"].demand == 0.0
                assert by_name(got)["agent-0"].demand == 1.5 and c.latest("agent-0") == by_name(got)["agent-0"]
                assert c.latest("nobody") is None
                assert c.statuses()["agent-0"].num_layers == 4
        finally:
            await cluster.stop_all()

    run(scenario)


def test_it_reconnects_after_an_agent_restarts() -> None:
    async def scenario() -> None:
        cluster = FakeCluster()
        a = cluster.add("agent-0")
        await a.start()
        try:
            async with PressureCollector(interval_ms=20, stale_after_s=5, backoff_initial_s=0.02,
                                         backoff_max_s=0.2) as c:
                c.set_targets({"agent-0": a.endpoint})
                await c.wait_until(lambda c: c.agents["agent-0"].connects == 1, 10)
                await a.stop()  # the process dies: the stream breaks
                await c.wait_until(lambda c: not c.agents["agent-0"].connected, 10)
                assert c.agents["agent-0"].last_error
                await c.wait_until(lambda c: c.agents["agent-0"].failures >= 2, 10)  # it keeps retrying
                a.restart_state()
                a.load = FakeLoad(blocks_needed=7)
                await a.start()  # the same port, a new process
                await c.wait_until(lambda c: c.agents["agent-0"].connects == 2, 10)
                await c.wait_until(lambda c: c.snapshot()[0].blocks_needed == 7, 10)
                assert c.agents["agent-0"].failures == 0 and a.counters.watch_streams == 2
        finally:
            await cluster.stop_all()

    run(scenario)


def test_an_agent_that_stops_reporting_goes_stale_and_comes_back() -> None:
    async def scenario() -> None:
        cluster = FakeCluster()
        a, b = cluster.add("agent-0"), cluster.add("agent-1")
        await cluster.start_all(a, b)
        clock = Clock()
        try:
            async with PressureCollector(interval_ms=20, stale_after_s=2.0, clock=clock) as c:
                assert c.snapshot() == []
                c.set_targets({"agent-0": a.endpoint, "agent-1": b.endpoint})
                await c.wait_until(lambda c: c.fresh() == ["agent-0", "agent-1"], 10)
                a.paused = True  # the stream stays open but says nothing
                await asyncio.sleep(0.1)
                clock.now += 2.5
                await c.wait_until(lambda c: c.fresh() == ["agent-1"], 10)  # agent-1 keeps reporting
                assert {p.name: p.stale for p in c.snapshot()} == {"agent-0": True, "agent-1": False}
                a.paused = False
                await c.wait_until(lambda c: c.fresh() == ["agent-0", "agent-1"], 10)
                assert not any(p.stale for p in c.snapshot())
        finally:
            await cluster.stop_all()

    run(scenario)


def test_grouped_agents_report_their_group_and_new_pool() -> None:
    async def scenario() -> None:
        cluster = FakeCluster()
        a, b = cluster.add("agent-0"), cluster.add("agent-1")
        await cluster.start_all(a, b)
        a.load = FakeLoad(blocks_needed=60, home_blocks_needed=40)
        try:
            async with PressureCollector(interval_ms=20, stale_after_s=5) as c:
                c.set_targets({"agent-0": a.endpoint, "agent-1": b.endpoint})
                await c.wait_until(lambda c: len(c.snapshot()) == 2, 10)
                fast = ExecutorSettings(commit_timeout_s=5, outcome_check_interval_s=0.05)
                assert (await drop_group({"agent-0": a.endpoint, "agent-1": b.endpoint}, settings=fast)).record.terminal
                got = await c.wait_until(lambda c: all(p.group for p in c.snapshot()) and c.snapshot(), 10)
                gid = group_id_for(["agent-0", "agent-1"])
                leader = by_name(got)["agent-0"]
                assert (leader.group, leader.home_blocks_needed, leader.blocks_total) == (gid, 40, 250)
                assert leader.kv_pool_bytes == 10000  # 250 blocks of the 2 layers it holds now (Status re-read)
                assert c.statuses()["agent-1"].layer_start == 2
        finally:
            await cluster.stop_all()

    run(scenario)


def test_removed_targets_stop_and_close_is_bounded() -> None:
    async def scenario() -> None:
        cluster = FakeCluster()
        a = cluster.add("agent-0")
        await a.start()
        try:
            c = PressureCollector(interval_ms=20, stale_after_s=5)
            c.set_targets({"agent-0": a.endpoint, "agent-x": "127.0.0.1:1"})  # one never answers
            await c.wait_until(lambda c: len(c.snapshot()) == 1, 10)
            task = c.agents["agent-0"].task
            c.set_targets({"agent-x": "127.0.0.1:1"})
            await asyncio.sleep(0.05)
            assert task is not None and task.done() and list(c.agents) == ["agent-x"]
            await asyncio.wait_for(c.close(), 2)
            assert c.agents == {}
        finally:
            await cluster.stop_all()

    run(scenario)
