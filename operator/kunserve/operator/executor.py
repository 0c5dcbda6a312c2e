"""The reconfiguration executor: one drop or restore through the agents' two-phase protocol.

    Pending ──▶ Preparing ──▶ Committed ──▶ Completed
       │            │
       ▼            ▼
     Failed     RolledBack

- Pending → Failed: the spec cannot be carried out (stale epoch, bad layer ranges, member without endpoint);
  no agent was called.
- Preparing: `Agent.Prepare` on every member of every group, in parallel, each with a deadline. Any failure
  → `Agent.Abort` on every member → RolledBack. Once all prepared, `preparedAt` is recorded, then
  `Agent.Commit` goes to each group's leader (stage 0) only: the leader carries the reconfiguration out on
  the other members over the Peer service. A refused Commit (ABORTED, FAILED_PRECONDITION, ...) → Abort on
  the group's members → RolledBack (for that group). A lost answer (deadline, connection) → the leader's
  `Agent.Status` tells: its epoch reached ours → committed; nothing prepared any more → failed; still prepared
  → `OutcomeUnknownError` after a few checks (the record stays Preparing; resuming later is safe).
- Committed → `on_committed` (write the topology to Redis, the pool's groups and epoch) → Completed.

The record is saved (`RecordStore.save`) after every step, so a restart resumes instead of repeating:
Pending starts; Preparing asks every leader's Status first (a leader at our epoch committed: its Commit is
sent again, which agents answer idempotently with the recorded result); the others are prepared again
(Prepare is idempotent for the same epoch) and committed; Committed re-runs `on_committed` (idempotent);
a terminal record is returned as it is. A Prepare left behind by an interrupted older reconfiguration
(the agent's prepared_epoch below ours) is aborted before preparing.

`run_drop` / `run_restore` (and their async forms) drive one group given only the agents' endpoints: what
`kunserve reconfigure --agents` and tests and benchmarks use to place a drop exactly where they want it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from kunserve.operator.agent_client import AgentCallError, AgentClients, AgentStatus, CommitOutcome, stage_specs
from kunserve.operator.cost_model import even_split
from kunserve.operator.plan_types import StagePlan
from kunserve.operator.planner import group_id_for
from kunserve.operator.reconfig import (
    Action,
    GroupChange,
    ReconfigPhase,
    ReconfigRecord,
    ReconfigSpec,
    ReconfigurationLog,
    check_ranges,
)

log = logging.getLogger(__name__)
OnCommitted = Callable[[ReconfigSpec, ReconfigRecord], Awaitable[None]]


class ExecutorError(Exception):
    """A reconfiguration could not be carried out (see the subclasses)."""


class OutcomeUnknownError(ExecutorError):
    """Whether a leader committed cannot be told now (it does not answer); the record was saved as it is and
    resuming later is safe."""


class ManualReconfigurationError(ExecutorError):
    """A manual drop or restore cannot start (agents disagree, no group to restore, ...)."""


class RecordStore(Protocol):
    async def save(self, record: ReconfigRecord) -> None: ...


@dataclass(slots=True)
class MemoryRecordStore:
    """Keeps every saved record (tests, and manual runs without a persistent store)."""

    history: list[ReconfigRecord] = field(default_factory=list)

    async def save(self, record: ReconfigRecord) -> None:
        self.history.append(record.copy())

    @property
    def phases(self) -> list[ReconfigPhase]:
        return [r.phase for r in self.history]


@dataclass(slots=True, frozen=True)
class ExecutorSettings:
    prepare_timeout_s: float = 30.0  # each member's Prepare (a restore reads weights into host memory)
    commit_timeout_s: float = 300.0  # the leader's Commit (drops / reloads layers on every member)
    abort_timeout_s: float = 10.0
    status_timeout_s: float = 5.0
    outcome_checks: int = 5  # Status probes of a leader whose Commit answer was lost
    outcome_check_interval_s: float = 0.5


class _CommitState(StrEnum):
    COMMITTED = "committed"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass(slots=True, frozen=True)
class _CommitResult:
    group: str
    state: _CommitState
    outcome: CommitOutcome | None = None
    error: str = ""


class Executor:
    def __init__(self, clients: AgentClients, settings: ExecutorSettings | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.clients = clients
        self.settings = settings or ExecutorSettings()
        self.clock = clock

    async def execute(self, spec: ReconfigSpec, endpoints: Mapping[str, str], *, record: ReconfigRecord | None = None,
                      store: RecordStore | None = None, on_committed: OnCommitted | None = None,
                      current_epoch: int | None = None, num_layers: int | None = None) -> ReconfigRecord:
        """Carry spec out from wherever `record` stands; returns the final record (also saved).

        endpoints: member -> host:port. current_epoch: the pool's epoch (a Pending spec must be newer).
        Raises OutcomeUnknownError (retry later) and whatever store.save / on_committed raise."""
        record = record.copy() if record is not None else ReconfigRecord()
        store = store or MemoryRecordStore()
        if record.terminal:
            return record
        if record.phase is ReconfigPhase.PENDING:
            problems = [str(p) for p in spec.problems(num_layers)]
            if current_epoch is not None and spec.epoch <= current_epoch:
                problems.append(f"epoch {spec.epoch} is not newer than the pool's epoch {current_epoch}")
            missing = [m for m in spec.members if m not in endpoints]
            if missing:
                problems.append(f"no endpoint for {missing}")
            if problems:
                return await self._finish(record, store, ReconfigPhase.FAILED, "; ".join(problems))
            record.phase, record.attempts, record.started_at = ReconfigPhase.PREPARING, 1, self.clock()
            record.message = f"preparing {len(spec.members)} members for epoch {spec.epoch}"
            await store.save(record)
        elif record.phase is ReconfigPhase.PREPARING:
            record.attempts += 1
            record.message = f"resumed (attempt {record.attempts})"
            await store.save(record)
        if record.phase is ReconfigPhase.PREPARING:
            await self._prepare_and_commit(spec, endpoints, record, store)
            if record.terminal:
                return record
        if record.phase is ReconfigPhase.COMMITTED:
            if not record.committed_groups:
                record.committed_groups = await self._committed_groups(spec, endpoints)
            if on_committed is not None:
                await on_committed(spec, record.copy())
            record.phase, record.completed_at = ReconfigPhase.COMPLETED, self.clock()
            await store.save(record)
        return record

    # ---- steps ---------------------------------------------------------------------------------------------
    async def _prepare_and_commit(self, spec: ReconfigSpec, endpoints: Mapping[str, str], record: ReconfigRecord,
                                  store: RecordStore) -> None:
        epoch = spec.epoch
        statuses = await self._statuses(spec.members, endpoints)
        committed_before = [g for g in spec.groups if _reached(statuses.get(g.leader), epoch)]
        if record.prepared_at is not None:  # a Commit may have gone out: a silent leader's group is undecidable
            silent = [g.id for g in spec.groups if g not in committed_before and isinstance(statuses[g.leader],
                                                                                           AgentCallError)]
            if silent:
                record.message = f"cannot tell whether groups {silent} committed: their leaders do not answer"
                await store.save(record)
                raise OutcomeUnknownError(record.message)
        pending = [g for g in spec.groups if g not in committed_before]
        failures: dict[str, str] = {}
        results: list[_CommitResult] = []
        if pending:
            members = [m for g in pending for m in g.members]
            await self._abort_stale(members, statuses, endpoints, epoch)
            errors = await self._prepare(spec, pending, endpoints)
            if errors:
                await self._abort(members, endpoints, epoch, f"prepare failed: {errors[0]}")
                failures.update({g.id: "Prepare failed: " + "; ".join(errors) for g in pending})
                if not committed_before:
                    await self._finish(record, store, ReconfigPhase.ROLLED_BACK,
                                       f"Prepare failed, every member aborted: {'; '.join(errors)}")
                    return
                pending = []
            else:
                record.prepared_at = self.clock()
                record.message = f"every member prepared epoch {epoch}; committing on " + ", ".join(
                    g.leader for g in pending)
                await store.save(record)
            results = list(await asyncio.gather(*(self._commit(g, endpoints, epoch) for g in pending)))
        for g in committed_before:  # committed before a restart: the Commit again fetches the recorded result
            results.append(await self._fetch_result(g, endpoints, epoch))
        unknown = [r for r in results if r.state is _CommitState.UNKNOWN]
        for r in results:
            if r.state is _CommitState.FAILED:
                failures[r.group] = r.error
                group = next(g for g in spec.groups if g.id == r.group)
                await self._abort(list(group.members), endpoints, epoch, f"commit failed: {r.error}")
        if unknown:
            record.message = "; ".join(f"group {r.group}: commit outcome unknown ({r.error})" for r in unknown)
            await store.save(record)
            raise OutcomeUnknownError(record.message)
        done = [r for r in results if r.state is _CommitState.COMMITTED]
        failed_text = "; ".join(f"group {gid}: {why}" for gid, why in failures.items())
        if not done:
            await self._finish(record, store, ReconfigPhase.ROLLED_BACK,
                               f"Commit failed, every member aborted: {failed_text}")
            return
        order = [g.id for g in spec.groups]
        record.committed_groups = tuple(sorted((r.group for r in done), key=order.index))
        record.members = tuple(m for r in done if r.outcome is not None for m in r.outcome.members)
        seconds = [r.outcome.seconds for r in done if r.outcome is not None]
        record.commit_seconds = max(seconds) if seconds else None
        record.phase, record.committed_at = ReconfigPhase.COMMITTED, self.clock()
        record.message = f"committed epoch {epoch}: " + "; ".join(str(m) for m in record.members)
        if failed_text:
            record.message += f"; not committed: {failed_text}"
        await store.save(record)

    async def _finish(self, record: ReconfigRecord, store: RecordStore, phase: ReconfigPhase,
                      message: str) -> ReconfigRecord:
        record.phase, record.message, record.completed_at = phase, message, self.clock()
        await store.save(record)
        log.warning("reconfiguration %s: %s", phase.value, message)
        return record

    async def _statuses(self, members: Sequence[str], endpoints: Mapping[str, str]
                        ) -> dict[str, AgentStatus | AgentCallError]:
        async def one(member: str) -> AgentStatus | AgentCallError:
            try:
                return await self.clients.status(endpoints[member], self.settings.status_timeout_s)
            except AgentCallError as exc:
                return exc

        answers = await asyncio.gather(*(one(m) for m in members))
        return dict(zip(members, answers, strict=True))

    async def _abort_stale(self, members: Sequence[str], statuses: Mapping[str, AgentStatus | AgentCallError],
                           endpoints: Mapping[str, str], epoch: int) -> None:
        for m in members:
            status = statuses.get(m)
            if isinstance(status, AgentStatus) and 0 < status.prepared_epoch < epoch:
                log.warning("%s still holds epoch %d prepared by an interrupted reconfiguration: aborting it",
                            m, status.prepared_epoch)
                await self._abort([m], endpoints, status.prepared_epoch, "stale prepare")

    async def _prepare(self, spec: ReconfigSpec, groups: Sequence[GroupChange],
                       endpoints: Mapping[str, str]) -> list[str]:
        """Prepare every member of groups in parallel; returns the failures (empty: all prepared)."""
        calls = []
        for g in groups:
            stages = stage_specs(g.stages, endpoints)
            for m in g.members:
                calls.append(self.clients.prepare(endpoints[m], spec.epoch, spec.action, stages, spec.reason,
                                                  self.settings.prepare_timeout_s))
        answers = await asyncio.gather(*calls, return_exceptions=True)
        errors = []
        for member, answer in zip([m for g in groups for m in g.members], answers, strict=True):
            if isinstance(answer, AgentCallError):
                hint = " (the agent does not implement Prepare)" if answer.unimplemented else ""
                errors.append(f"{member}: {answer.code}: {answer.details}{hint}")
            elif isinstance(answer, BaseException):
                raise answer
        return errors

    async def _abort(self, members: Sequence[str], endpoints: Mapping[str, str], epoch: int, reason: str) -> None:
        """Abort on every member, best effort (Abort never fails on an agent that answers)."""
        answers = await asyncio.gather(*(self.clients.abort(endpoints[m], epoch, reason, self.settings.abort_timeout_s)
                                         for m in members), return_exceptions=True)
        for member, answer in zip(members, answers, strict=True):
            if isinstance(answer, AgentCallError):
                log.warning("abort of epoch %d on %s failed: %s", epoch, member, answer)
            elif isinstance(answer, BaseException):
                raise answer

    async def _commit(self, group: GroupChange, endpoints: Mapping[str, str], epoch: int) -> _CommitResult:
        leader = endpoints[group.leader]
        try:
            return _CommitResult(group.id, _CommitState.COMMITTED,
                                 await self.clients.commit(leader, epoch, self.settings.commit_timeout_s))
        except AgentCallError as exc:
            if exc.definite:
                return _CommitResult(group.id, _CommitState.FAILED, error=f"{exc.code}: {exc.details}")
            first_error = exc
        # The answer was lost: ask the leader what happened.
        resent = False
        for _check in range(max(self.settings.outcome_checks, 1)):
            await asyncio.sleep(self.settings.outcome_check_interval_s)
            try:
                status = await self.clients.status(leader, self.settings.status_timeout_s)
            except AgentCallError:
                continue
            if status.epoch >= epoch:
                return await self._fetch_result(group, endpoints, epoch)
            if status.prepared_epoch != epoch:
                return _CommitResult(group.id, _CommitState.FAILED,
                                     error=f"{first_error.code}, and the leader no longer holds epoch {epoch} prepared")
            if first_error.code == "UNAVAILABLE" and not resent:  # most likely never delivered: send it again
                resent = True
                try:
                    return _CommitResult(group.id, _CommitState.COMMITTED,
                                         await self.clients.commit(leader, epoch, self.settings.commit_timeout_s))
                except AgentCallError as exc:
                    if exc.definite:
                        return _CommitResult(group.id, _CommitState.FAILED, error=f"{exc.code}: {exc.details}")
        return _CommitResult(group.id, _CommitState.UNKNOWN, error=f"{first_error.code}: {first_error.details}")

    async def _fetch_result(self, group: GroupChange, endpoints: Mapping[str, str], epoch: int) -> _CommitResult:
        """A group whose leader reached epoch: its Commit again returns the recorded result (idempotent)."""
        try:
            outcome = await self.clients.commit(endpoints[group.leader], epoch, self.settings.commit_timeout_s)
        except AgentCallError as exc:
            log.warning("group %s committed epoch %d, but its result could not be read again: %s", group.id, epoch, exc)
            outcome = None
        return _CommitResult(group.id, _CommitState.COMMITTED, outcome)

    async def _committed_groups(self, spec: ReconfigSpec, endpoints: Mapping[str, str]) -> tuple[str, ...]:
        """For a Committed record whose list of committed groups was lost: one group committed by definition;
        with several, their leaders tell."""
        if len(spec.groups) == 1:
            return (spec.groups[0].id,)
        statuses = await self._statuses([g.leader for g in spec.groups], endpoints)
        silent = [g.id for g in spec.groups if isinstance(statuses[g.leader], AgentCallError)]
        if silent:
            raise OutcomeUnknownError(f"cannot tell which groups committed: leaders of {silent} do not answer")
        return tuple(g.id for g in spec.groups if _reached(statuses[g.leader], spec.epoch))


def _reached(status: AgentStatus | AgentCallError | None, epoch: int) -> bool:
    return isinstance(status, AgentStatus) and status.epoch >= epoch


# ------------------------------------------------------------------------------------------ manual reconfiguration


async def drop_group(endpoints: Mapping[str, str] | Sequence[tuple[str, str]],
                     ranges: Sequence[tuple[int, int]] | None = None, epoch: int | None = None, *,
                     group_id: str | None = None, pool: str = "manual", reason: str = "manual drop",
                     clients: AgentClients | None = None, settings: ExecutorSettings | None = None,
                     store: RecordStore | None = None, on_committed: OnCommitted | None = None) -> ReconfigurationLog:
    """Drop: the agents (agent id -> host:port, in pipeline order) form one group keeping `ranges` (default:
    an even split of the model's layers). epoch defaults to one above every member's committed or prepared
    epoch. Returns the spec and the final record (phase Completed, RolledBack or Failed)."""
    members = dict(endpoints)
    if len(members) < 2:
        raise ManualReconfigurationError("a drop needs at least 2 agents")
    own = clients is None
    clients = clients or AgentClients()
    try:
        statuses = await _all_statuses(clients, members)
        layers = {s.num_layers for s in statuses.values()}
        if len(layers) != 1:
            raise ManualReconfigurationError(f"the agents serve models of different depths: {sorted(layers)}")
        num_layers = layers.pop()
        chosen = list(ranges) if ranges is not None else even_split(num_layers, len(members))
        problem = check_ranges(chosen, num_layers)
        if problem or len(chosen) != len(members):
            raise ManualReconfigurationError(problem or f"{len(chosen)} ranges for {len(members)} agents")
        names = tuple(members)
        stages = tuple(StagePlan(n, a, b) for n, (a, b) in zip(names, chosen, strict=True))
        spec = ReconfigSpec(pool=pool, epoch=epoch or _next_epoch(statuses.values()), action=Action.DROP,
                            groups=(GroupChange(group_id or group_id_for(names), names, stages),), reason=reason,
                            manual=True)
        record = await Executor(clients, settings).execute(spec, members, store=store, on_committed=on_committed,
                                                           num_layers=num_layers)
        return ReconfigurationLog(f"{pool}-drop-{spec.epoch}", spec, record)
    finally:
        if own:
            await clients.close()


async def restore_group(endpoints: Mapping[str, str] | Sequence[tuple[str, str]], epoch: int | None = None, *,
                        group_id: str | None = None, pool: str = "manual", reason: str = "manual restore",
                        clients: AgentClients | None = None, settings: ExecutorSettings | None = None,
                        store: RecordStore | None = None, on_committed: OnCommitted | None = None
                        ) -> ReconfigurationLog:
    """Restore the group the first agent belongs to (its Status names the members, their endpoints and layer
    ranges; further endpoints are only used for members it does not name)."""
    given = dict(endpoints)
    if not given:
        raise ManualReconfigurationError("a restore needs the endpoint of at least one member")
    own = clients is None
    clients = clients or AgentClients()
    try:
        first_id, first_endpoint = next(iter(given.items()))
        status = await clients.status(first_endpoint)
        if not status.group or not status.role.grouped:
            raise ManualReconfigurationError(f"{first_id} ({first_endpoint}) is not in a group (role "
                                             f"{status.role.value})")
        members = {s.agent_id: s.endpoint or given.get(s.agent_id, "") for s in status.group}
        statuses = await _all_statuses(clients, members)
        names = tuple(members)
        stages = tuple(StagePlan(s.agent_id, s.layer_start, s.layer_end) for s in status.group)
        spec = ReconfigSpec(pool=pool, epoch=epoch or _next_epoch(statuses.values()), action=Action.RESTORE,
                            groups=(GroupChange(group_id or group_id_for(names), names, stages),), reason=reason,
                            manual=True)
        record = await Executor(clients, settings).execute(spec, members, store=store, on_committed=on_committed,
                                                           num_layers=status.num_layers)
        return ReconfigurationLog(f"{pool}-restore-{spec.epoch}", spec, record)
    finally:
        if own:
            await clients.close()


def run_drop(endpoints: Mapping[str, str] | Sequence[tuple[str, str]], ranges: Sequence[tuple[int, int]] | None = None,
             epoch: int | None = None, **options: object) -> ReconfigurationLog:
    """Synchronous `drop_group` (for scripts and benchmarks; not inside a running event loop)."""
    return asyncio.run(drop_group(endpoints, ranges, epoch, **options))  # type: ignore[arg-type]


def run_restore(endpoints: Mapping[str, str] | Sequence[tuple[str, str]], epoch: int | None = None,
                **options: object) -> ReconfigurationLog:
    """Synchronous `restore_group`."""
    return asyncio.run(restore_group(endpoints, epoch, **options))  # type: ignore[arg-type]


async def _all_statuses(clients: AgentClients, members: Mapping[str, str]) -> dict[str, AgentStatus]:
    names = list(members)
    answers = await asyncio.gather(*(clients.status(members[n]) for n in names), return_exceptions=True)
    out: dict[str, AgentStatus] = {}
    for name, answer in zip(names, answers, strict=True):
        if isinstance(answer, AgentCallError):
            raise ManualReconfigurationError(f"{name} does not answer Status: {answer}") from answer
        if isinstance(answer, BaseException):
            raise answer
        out[name] = answer
    return out


def _next_epoch(statuses: Iterable[AgentStatus]) -> int:
    return 1 + max(max(s.epoch, s.prepared_epoch) for s in statuses)
