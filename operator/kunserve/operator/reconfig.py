"""Reconfigurations as values: what one drop or restore changes, how far it got, and the groups it leaves.

- `ReconfigSpec`: the spec of a Reconfiguration resource (pool, epoch, action, groups with their stage layer
  ranges, reason, pressure snapshot); `from_cr_spec` validates a hand-written one (the CRD's rules again:
  not every API server runs them) and `to_cr_spec` writes it back.
- `ReconfigRecord`: the progress of one reconfiguration through the two-phase protocol (phase, attempts,
  timings, the groups that committed, what each member did), which the caller persists after every step (the
  Reconfiguration's status in Kubernetes, Redis in local mode) so a restart resumes instead of repeating.
- `FormedGroup` and `apply_committed`: the pool's current groups (a ServingPool's status.groups) and how a
  committed reconfiguration changes them.

Pure: no I/O, no clock (callers pass times), every value immutable except the record the executor advances.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kunserve.operator.plan_types import ActiveGroup, GroupPhase, ReplicaPressure, StagePlan
from kunserve.operator.pool_spec import SpecProblem
from kunserve.operator.spec_reader import POOL_NAME, SpecReader

GROUP_ID = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # the CRD's pattern of group ids and replica names
MAX_NAME = 63


class Action(StrEnum):
    DROP = "Drop"
    RESTORE = "Restore"


class ReconfigPhase(StrEnum):
    """Progress of a reconfiguration (the Reconfiguration CRD's status.phase)."""

    PENDING = "Pending"  # accepted, nothing sent to any agent
    PREPARING = "Preparing"  # Prepare sent (and, once preparedAt is set, maybe Commit)
    COMMITTED = "Committed"  # the leaders committed; the topology and the pool's groups not yet written
    COMPLETED = "Completed"  # committed and published under the new epoch
    FAILED = "Failed"  # rejected before any agent changed (stale epoch, invalid spec, unknown pool)
    ROLLED_BACK = "RolledBack"  # a Prepare or the Commit failed; every member was aborted, nothing changed


TERMINAL_PHASES = frozenset({ReconfigPhase.COMPLETED, ReconfigPhase.FAILED, ReconfigPhase.ROLLED_BACK})


class InvalidReconfiguration(ValueError):
    """A Reconfiguration's spec cannot be carried out as written; `problems` says why, field by field."""

    def __init__(self, problems: Sequence[SpecProblem | str]) -> None:
        self.problems = tuple(p if isinstance(p, SpecProblem) else SpecProblem("spec", p) for p in problems)
        super().__init__("; ".join(str(p) for p in self.problems))


# ------------------------------------------------------------------------------------------------- the spec


@dataclass(slots=True, frozen=True)
class GroupChange:
    """One group of a reconfiguration: members in pipeline order and, for a drop (optional for a restore:
    the pool's record of the group fills them in), the layer range each keeps."""

    id: str
    members: tuple[str, ...]
    stages: tuple[StagePlan, ...] = ()

    @property
    def leader(self) -> str:
        """Stage 0: the member that receives the Commit."""
        return self.stages[0].replica if self.stages else self.members[0]

    def ranges(self) -> tuple[tuple[int, int], ...]:
        return tuple((s.layer_start, s.layer_end) for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "members": list(self.members)}
        if self.stages:
            out["stages"] = [s.to_dict() for s in self.stages]
        return out


@dataclass(slots=True, frozen=True)
class ReconfigSpec:
    pool: str
    epoch: int
    action: Action
    groups: tuple[GroupChange, ...]
    reason: str = ""
    manual: bool = False
    pressure: tuple[Mapping[str, Any], ...] = ()  # the planner's snapshot, CRD shape (replica, blocksNeeded, ...)

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(m for g in self.groups for m in g.members)

    def to_cr_spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pool": self.pool, "epoch": self.epoch, "action": self.action.value,
                               "groups": [g.to_dict() for g in self.groups], "manual": self.manual}
        if self.reason:
            out["reason"] = self.reason[:1024]
        if self.pressure:
            out["pressure"] = [dict(p) for p in self.pressure]
        return out

    @classmethod
    def from_cr_spec(cls, raw: Any) -> ReconfigSpec:
        """Parse and check a Reconfiguration's spec; raises InvalidReconfiguration naming every problem."""
        problems: list[SpecProblem] = []
        r = SpecReader(problems)
        if not isinstance(raw, Mapping):
            raise InvalidReconfiguration([SpecProblem("spec", "is required")])
        pool = r.str_(raw, "pool", "spec", pattern=POOL_NAME, max_len=40, required=True)
        epoch = r.int_(raw, "epoch", "spec", None, 1, (1 << 63) - 1)
        if epoch is None:
            r.bad("spec.epoch", "is required")
        action = r.enum(raw, "action", "spec", Action, None)
        if action is None and "action" not in raw:
            r.bad("spec.action", "is required (Drop or Restore)")
        reason = r.str_(raw, "reason", "spec", max_len=1024) or ""
        manual = r.bool_(raw, "manual", "spec", False)
        groups_raw = raw.get("groups")
        groups: list[GroupChange] = []
        if not isinstance(groups_raw, list) or not groups_raw:
            r.bad("spec.groups", "needs at least one group")
        else:
            for i, g in enumerate(groups_raw):
                group = _group(r, g, f"spec.groups[{i}]")
                if group is not None:
                    groups.append(group)
        pressure = raw.get("pressure") or []
        if not isinstance(pressure, list) or not all(isinstance(p, Mapping) for p in pressure):
            r.bad("spec.pressure", "must be a list of objects")
            pressure = []
        if problems or pool is None or epoch is None or action is None:
            raise InvalidReconfiguration(problems)
        spec = cls(pool=pool, epoch=epoch, action=action, groups=tuple(groups), reason=reason, manual=manual,
                   pressure=tuple(dict(p) for p in pressure))
        structural = spec.problems()
        if structural:
            raise InvalidReconfiguration(structural)
        return spec

    def problems(self, num_layers: int | None = None) -> list[SpecProblem]:
        """What makes this spec impossible to carry out (num_layers: the model's L, when known)."""
        out: list[SpecProblem] = []
        seen_members: set[str] = set()
        seen_ids: set[str] = set()
        for i, g in enumerate(self.groups):
            where = f"spec.groups[{i}]"
            if g.id in seen_ids:
                out.append(SpecProblem(f"{where}.id", f"group {g.id!r} appears twice"))
            seen_ids.add(g.id)
            if len(set(g.members)) != len(g.members):
                out.append(SpecProblem(f"{where}.members", "a member appears twice"))
            for m in g.members:
                if m in seen_members:
                    out.append(SpecProblem(f"{where}.members", f"{m!r} is in two groups"))
                seen_members.add(m)
            if self.action is Action.DROP and len(g.members) < 2:
                out.append(SpecProblem(f"{where}.members", "a Drop needs at least 2 members in every group"))
            if self.action is Action.DROP and len(g.stages) != len(g.members):
                out.append(SpecProblem(f"{where}.stages", "a Drop gives every group exactly one stage per member"))
            if g.stages:
                if tuple(s.replica for s in g.stages) != g.members:
                    out.append(SpecProblem(f"{where}.stages", "stages must name the members, in the members' order"))
                problem = check_ranges(g.ranges(), num_layers)
                if problem:
                    out.append(SpecProblem(f"{where}.stages", problem))
        return out


def check_ranges(ranges: Sequence[tuple[int, int]], num_layers: int | None = None) -> str | None:
    """None when the ranges are non-empty, contiguous, start at 0 (and end at num_layers when given)."""
    expected = 0
    for a, b in ranges:
        if a != expected or b <= a:
            return (f"layer ranges {[list(r) for r in ranges]} must be contiguous non-empty [start, end) ranges "
                    "starting at 0")
        expected = b
    if num_layers is not None and expected != num_layers:
        return f"layer ranges {[list(r) for r in ranges]} must end at the model's {num_layers} layers"
    return None


def _group(r: SpecReader, raw: Any, where: str) -> GroupChange | None:
    if not isinstance(raw, Mapping):
        r.bad(where, "must be an object")
        return None
    gid = r.str_(raw, "id", where, pattern=GROUP_ID, max_len=MAX_NAME, required=True)
    members_raw = raw.get("members")
    members: list[str] = []
    if not isinstance(members_raw, list) or not members_raw:
        r.bad(f"{where}.members", "needs at least one replica name")
    else:
        for j, m in enumerate(members_raw):
            if not isinstance(m, str) or not GROUP_ID.match(m) or len(m) > MAX_NAME:
                r.bad(f"{where}.members[{j}]", f"{m!r} is not a replica name")
            else:
                members.append(m)
    stages: list[StagePlan] = []
    stages_raw = raw.get("stages")
    if stages_raw is not None:
        if not isinstance(stages_raw, list):
            r.bad(f"{where}.stages", "must be a list")
        else:
            for j, s in enumerate(stages_raw):
                path = f"{where}.stages[{j}]"
                if not isinstance(s, Mapping):
                    r.bad(path, "must be an object")
                    continue
                replica = r.str_(s, "replica", path, pattern=GROUP_ID, max_len=MAX_NAME, required=True)
                start = r.int_(s, "layerStart", path, None, 0, 65535)
                end = r.int_(s, "layerEnd", path, None, 1, 65536)
                if start is None or end is None:
                    r.bad(path, "needs layerStart and layerEnd")
                    continue
                if start >= end:
                    r.bad(path, f"layerStart ({start}) must be lower than layerEnd ({end})")
                if replica is not None:
                    stages.append(StagePlan(replica, start, end))
    if gid is None:
        return None
    return GroupChange(id=gid, members=tuple(members), stages=tuple(stages))


def pressure_snapshot(pressures: Iterable[ReplicaPressure]) -> tuple[dict[str, Any], ...]:
    """The planner's view in the CRD's shape (demand omitted when infinite)."""
    return tuple({k: v for k, v in p.to_dict().items() if v is not None} for p in pressures)


def reconfiguration_name(pool: str, action: Action, epoch: int) -> str:
    """Deterministic name of the planner's Reconfiguration for an epoch: creating it twice conflicts instead of
    repeating the reconfiguration."""
    return f"{pool}-{action.value.lower()}-{epoch}"


# ------------------------------------------------------------------------------------------------ the groups


@dataclass(slots=True, frozen=True)
class FormedGroup:
    """A group the pool runs now (an entry of a ServingPool's status.groups)."""

    id: str
    stages: tuple[StagePlan, ...]
    epoch: int
    reconfiguration: str = ""
    state: GroupPhase = GroupPhase.COOPERATIVE

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(s.replica for s in self.stages)

    @property
    def leader(self) -> str:
        return self.stages[0].replica

    def to_active(self, model: str) -> ActiveGroup:
        return ActiveGroup(group_id=self.id, model=model, stages=self.stages, phase=self.state)

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "members": list(self.members),
                               "stages": [s.to_dict() for s in self.stages], "epoch": self.epoch,
                               "state": self.state.value}
        if self.reconfiguration:
            out["reconfiguration"] = self.reconfiguration
        return out

    @classmethod
    def from_status(cls, raw: Mapping[str, Any]) -> FormedGroup:
        """From a status.groups entry; raises ValueError when it is malformed."""
        try:
            stages = tuple(StagePlan(str(s["replica"]), int(s["layerStart"]), int(s["layerEnd"]))
                           for s in raw.get("stages") or [])
            if not stages:
                raise ValueError("no stages")
            return cls(id=str(raw["id"]), stages=stages, epoch=int(raw.get("epoch") or 0),
                       reconfiguration=str(raw.get("reconfiguration") or ""),
                       state=GroupPhase(raw.get("state") or GroupPhase.COOPERATIVE.value))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed group entry {dict(raw)!r}: {exc}") from exc


def groups_from_status(raw: Any) -> tuple[FormedGroup, ...]:
    """The groups in a ServingPool's status.groups (malformed entries raise ValueError)."""
    if not isinstance(raw, list):
        return ()
    return tuple(FormedGroup.from_status(g) for g in raw if isinstance(g, Mapping))


def resolve_restore(spec: ReconfigSpec, groups: Sequence[FormedGroup]) -> ReconfigSpec:
    """A restore's groups with their stages taken from the pool's record of them; raises InvalidReconfiguration
    when a group is not formed, or its members or stages differ from the record (a stale restore)."""
    if spec.action is not Action.RESTORE:
        return spec
    by_id = {g.id: g for g in groups}
    problems: list[str] = []
    resolved: list[GroupChange] = []
    for g in spec.groups:
        formed = by_id.get(g.id)
        if formed is None:
            problems.append(f"group {g.id!r} is not formed in pool {spec.pool!r} (formed: {sorted(by_id) or 'none'})")
            continue
        if g.members != formed.members:
            problems.append(f"group {g.id!r} has members {list(formed.members)}, not {list(g.members)}")
            continue
        if g.stages and g.stages != formed.stages:
            problems.append(f"group {g.id!r} holds {[s.to_dict() for s in formed.stages]}, "
                            f"not {[s.to_dict() for s in g.stages]}")
            continue
        resolved.append(GroupChange(g.id, formed.members, formed.stages))
    if problems:
        raise InvalidReconfiguration(problems)
    return dataclasses.replace(spec, groups=tuple(resolved))


def check_drop(spec: ReconfigSpec, replicas: Sequence[str], groups: Sequence[FormedGroup]) -> None:
    """Raise InvalidReconfiguration unless every member of a drop is a replica of the pool in no group."""
    if spec.action is not Action.DROP:
        return
    known, grouped = set(replicas), {m: g.id for g in groups for m in g.members}
    problems = []
    for m in spec.members:
        if m not in known:
            problems.append(f"{m!r} is not a replica of pool {spec.pool!r} ({', '.join(replicas)})")
        elif m in grouped:
            problems.append(f"{m!r} is already a member of group {grouped[m]!r}")
    if problems:
        raise InvalidReconfiguration(problems)


def apply_committed(groups: Sequence[FormedGroup], spec: ReconfigSpec, committed: Iterable[str],
                    reconfiguration: str = "") -> tuple[FormedGroup, ...]:
    """The pool's groups once the `committed` groups of spec took effect (idempotent: applying twice is once)."""
    done = set(committed)
    changed = {g.id for g in spec.groups if g.id in done}
    kept = [g for g in groups if g.id not in changed]
    if spec.action is Action.DROP:
        kept += [FormedGroup(g.id, g.stages, spec.epoch, reconfiguration) for g in spec.groups if g.id in changed]
    return tuple(sorted(kept, key=lambda g: g.id))


# ------------------------------------------------------------------------------------------------ the record


@dataclass(slots=True, frozen=True)
class MemberOutcome:
    """What one member did in a commit (the leader's CommitResponse)."""

    agent_id: str
    layer_start: int
    layer_end: int
    kv_blocks_total: int
    seconds: float
    requests_moved: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"agentId": self.agent_id, "layerStart": self.layer_start, "layerEnd": self.layer_end,
                "kvBlocksTotal": self.kv_blocks_total, "seconds": round(self.seconds, 6),
                "requestsMoved": self.requests_moved}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> MemberOutcome:
        return cls(str(raw["agentId"]), int(raw["layerStart"]), int(raw["layerEnd"]), int(raw["kvBlocksTotal"]),
                   float(raw["seconds"]), int(raw.get("requestsMoved") or 0))

    def __str__(self) -> str:
        return (f"{self.agent_id} [{self.layer_start}, {self.layer_end}) {self.kv_blocks_total} blocks "
                f"{self.seconds:.3f} s" + (f", {self.requests_moved} requests moved" if self.requests_moved else ""))


@dataclass(slots=True)
class ReconfigRecord:
    """How far one reconfiguration got. Times are unix seconds (None: not reached)."""

    phase: ReconfigPhase = ReconfigPhase.PENDING
    message: str = ""
    attempts: int = 0
    started_at: float | None = None  # first Prepare sent
    prepared_at: float | None = None  # every member prepared; a Commit may have been sent since
    committed_at: float | None = None
    completed_at: float | None = None
    committed_groups: tuple[str, ...] = ()
    members: tuple[MemberOutcome, ...] = ()
    commit_seconds: float | None = None  # the leader's own measure of its commit(s)

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES

    def copy(self) -> ReconfigRecord:
        return dataclasses.replace(self)

    # ---- the Reconfiguration's status (CRD fields, plus committedGroups / members that a structural schema
    # may prune: the executor re-derives them from the agents when they are missing) ----------------------------
    def to_status(self) -> dict[str, Any]:
        timings: dict[str, Any] = {}
        for key, value in (("startedAt", self.started_at), ("preparedAt", self.prepared_at),
                           ("committedAt", self.committed_at), ("completedAt", self.completed_at)):
            if value is not None:
                timings[key] = rfc3339(value)
        if self.started_at is not None and self.prepared_at is not None:
            timings["prepareSeconds"] = round(max(self.prepared_at - self.started_at, 0.0), 6)
        if self.prepared_at is not None and self.committed_at is not None:
            timings["commitSeconds"] = round(max(self.committed_at - self.prepared_at, 0.0), 6)
        if self.started_at is not None and self.completed_at is not None:
            timings["totalSeconds"] = round(max(self.completed_at - self.started_at, 0.0), 6)
        out: dict[str, Any] = {"phase": self.phase.value, "message": self.message[:32768], "attempts": self.attempts,
                               "timings": timings}
        if self.committed_groups:
            out["committedGroups"] = list(self.committed_groups)
        if self.members:
            out["members"] = [m.to_dict() for m in self.members]
        return out

    @classmethod
    def from_status(cls, raw: Any) -> ReconfigRecord:
        """From a Reconfiguration's status (missing or malformed fields take their defaults)."""
        if not isinstance(raw, Mapping):
            return cls()
        try:
            phase = ReconfigPhase(raw.get("phase") or ReconfigPhase.PENDING.value)
        except ValueError:
            phase = ReconfigPhase.PENDING
        found = raw.get("timings")
        timings: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
        members: list[MemberOutcome] = []
        for m in raw.get("members") or []:
            try:
                members.append(MemberOutcome.from_dict(m))
            except (KeyError, TypeError, ValueError):
                continue
        attempts = raw.get("attempts")
        return cls(phase=phase, message=str(raw.get("message") or ""),
                   attempts=attempts if isinstance(attempts, int) else 0,
                   started_at=parse_rfc3339(timings.get("startedAt")),
                   prepared_at=parse_rfc3339(timings.get("preparedAt")),
                   committed_at=parse_rfc3339(timings.get("committedAt")),
                   completed_at=parse_rfc3339(timings.get("completedAt")),
                   committed_groups=tuple(str(g) for g in raw.get("committedGroups") or []),
                   members=tuple(members))

    def to_json(self) -> str:
        return json.dumps(self.to_status(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ReconfigRecord:
        return cls.from_status(json.loads(text))


def rfc3339(unix_s: float) -> str:
    """RFC 3339 UTC with milliseconds (the CRD's date-time)."""
    moment = datetime.datetime.fromtimestamp(unix_s, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_rfc3339(text: Any) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


@dataclass(slots=True, frozen=True)
class ReconfigurationLog:
    """One finished reconfiguration as local mode prints and stores it."""

    name: str
    spec: ReconfigSpec
    record: ReconfigRecord = field(default_factory=ReconfigRecord)

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "spec": self.spec.to_cr_spec(), "status": self.record.to_status()},
                          separators=(",", ":"))

    def summary(self) -> str:
        r, s = self.record, self.spec
        groups = "; ".join(
            f"{g.id}: " + ", ".join(f"{st.replica} [{st.layer_start}, {st.layer_end})" for st in g.stages)
            if g.stages else f"{g.id}: {', '.join(g.members)}" for g in s.groups)
        took = f" in {r.completed_at - r.started_at:.2f} s" if r.completed_at and r.started_at else ""
        text = f"epoch {s.epoch} {s.action.value} {groups}: {r.phase.value}{took}"
        if r.message:
            text += f" ({r.message})"
        return text
