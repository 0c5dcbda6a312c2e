"""What local mode's controller does when it starts again next to running agents (as the operator does after a
restart in Kubernetes): resume from what is persisted in Redis, never guess.

- The pool's last published state (`kunserve:local:{pool}`) gives the epoch and the formed groups.
- Every reconfiguration record (`kunserve:reconfigurations:{pool}`) that is not terminal is resumed by the
  executor, oldest epoch first, from its recorded phase: one still preparing is prepared again (Prepare is
  idempotent) and committed, or rolled back on every member if one refuses; a leader that reached the epoch is
  asked for its result again and the commit is completed (the groups and topology are published under it);
  never left mixed. Attempts are bounded: a record whose outcome stays unknown (its leader
  does not answer) is left as it is, reported, and resumed again at the next start.
- No epoch is handed out twice: the next one is above every record's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from kunserve.operator.executor import OutcomeUnknownError
from kunserve.operator.local_controller import LocalController, RedisRecordStore, records_key, state_key
from kunserve.operator.reconfig import FormedGroup, ReconfigPhase, ReconfigRecord, ReconfigSpec

log = logging.getLogger(__name__)
RESUME_ATTEMPTS = 5
RESUME_BACKOFF_S = 1.0


@dataclass(slots=True)
class Recovery:
    """What `recover` found and did."""

    epoch: int = 0
    groups: tuple[str, ...] = ()
    resumed: dict[str, ReconfigPhase] = field(default_factory=dict)  # record -> the phase it ended in
    unknown: tuple[str, ...] = ()  # records whose outcome stayed unknown (left as they were)

    def summary(self) -> str:
        done = ", ".join(f"{n}: {p.value}" for n, p in self.resumed.items()) or "none"
        left = f"; outcome unknown, left: {', '.join(self.unknown)}" if self.unknown else ""
        return f"recovered epoch {self.epoch}, groups {list(self.groups)}; resumed {done}{left}"


async def recover(ctl: LocalController, attempts: int = RESUME_ATTEMPTS,
                  backoff_s: float = RESUME_BACKOFF_S) -> Recovery:
    """Load the epoch and groups the pool last published, resume every unfinished reconfiguration."""
    async with ctl.lock:
        raw = await ctl.redis.get(state_key(ctl.name))
        if raw:
            state = json.loads(raw)
            ctl.epoch = int(state.get("epoch") or 0)
            ctl.groups = tuple(FormedGroup.from_status(g) for g in state.get("groups") or [])
        ctl.allocated = max(ctl.allocated, ctl.epoch)
        pending: list[tuple[str, ReconfigSpec, ReconfigRecord]] = []
        for name, text in (await ctl.redis.hgetall(records_key(ctl.name))).items():
            doc = json.loads(text)
            spec = ReconfigSpec.from_cr_spec(doc["spec"])
            record = ReconfigRecord.from_status(doc.get("status"))
            ctl.allocated = max(ctl.allocated, spec.epoch)
            if not record.terminal:
                pending.append((str(name), spec, record))
        found = Recovery()
        unknown = []
        for name, spec, record in sorted(pending, key=lambda p: p[1].epoch):
            phase = await resume(ctl, name, spec, record, attempts, backoff_s)
            if phase is None:
                unknown.append(name)
            else:
                found.resumed[name] = phase
        await ctl.publish()
        found.epoch, found.groups, found.unknown = ctl.epoch, tuple(g.id for g in ctl.groups), tuple(unknown)
        ctl.out(found.summary())
        return found


async def resume(ctl: LocalController, name: str, spec: ReconfigSpec, record: ReconfigRecord,
                 attempts: int = RESUME_ATTEMPTS, backoff_s: float = RESUME_BACKOFF_S) -> ReconfigPhase | None:
    """Carry one unfinished reconfiguration to a terminal phase from its record; None: outcome still unknown."""
    store = RedisRecordStore(ctl.redis, ctl.name, name, spec, record)
    endpoints = {m: ctl.endpoints[m] for m in spec.members if m in ctl.endpoints}
    for attempt in range(1, attempts + 1):
        try:
            final = await ctl.executor.execute(spec, endpoints, record=store.last, store=store,
                                               on_committed=lambda s, r: ctl.committed(name, s, r),
                                               current_epoch=ctl.epoch, num_layers=ctl.cost.num_layers)
            ctl.out(f"resumed {name}: {final.phase.value} ({final.message})")
            return final.phase
        except OutcomeUnknownError as exc:
            log.warning("resuming %s, attempt %d of %d: %s", name, attempt, attempts, exc)
            await asyncio.sleep(backoff_s)
    return None
