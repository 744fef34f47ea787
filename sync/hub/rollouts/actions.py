"""What changes a rollout: start, the controller's step / complete / abort, and the
operator's pause, resume and abort.

Each is one read-modify-write of the record under the rollouts lock, with the
signed group state published (sync/hub/publish.py) inside the same lock, so the
record and the signed state move together and the CLI and the controller never
act on a stale record. Ringing the doorbell is the caller's (it is MQTT, and a
lost doorbell delays devices, it does not change what was signed).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping

from ...errors import HubError
from ..fleet import DeviceView
from ..publish import (
    PublishResult,
    RolloutTarget,
    abort_rollout,
    complete_rollout,
    current_desired,
    publish_rollout_step,
)
from ..repository import HubRepository
from .decide import Decision, evaluate
from .record import Plan, RolloutRecord
from .store import RolloutStore

log = logging.getLogger("edgefleet.hub.rollout")


def start(repo: HubRepository, store: RolloutStore, group: str, target: RolloutTarget, plan: Plan,
          now: float) -> tuple[RolloutRecord, PublishResult]:
    """Record a new rollout and sign its first step."""
    plan.check()
    with store.lock():
        for other in store.active():
            if other.group == group and other.model == target.name:
                raise HubError(f"rollout {other.id} of {target.name} in group {group} is {other.state}; "
                               f"abort it first (`edgefleet hub rollout abort {other.id}`)")
        state = current_desired(repo, "group", group)
        base = state.models.get(target.name) if state else None
        record = RolloutRecord(
            id=f"r-{secrets.token_hex(3)}", group=group, model=target.name,
            from_version=base.version if base else "", to_version=target.version, to_files=dict(target.files),
            plan=plan, salt=secrets.token_hex(8), serial=0, step_started_at=now, created_at=now)
        result = publish_rollout_step(repo, group, target, record.id, plan.steps[0], record.salt,
                                      record.from_version)
        record.serial = result.serial
        record.history.append({"at": now, "event": "step", "step": 1, "percent": plan.steps[0],
                               "serial": result.serial})
        store.save(record)
        return record, result


def step(repo: HubRepository, store: RolloutStore, rollout_id: str, fleet: Mapping[str, DeviceView],
         now: float) -> tuple[RolloutRecord, Decision | None, PublishResult | None]:
    """The controller's turn: evaluate and act. Returns the record, the decision and what
    was signed (None: nothing)."""
    with store.lock():
        record = store.load(rollout_id)
        if record.done:
            return record, None, None
        decision = evaluate(record, fleet, now)
        before = (record.counts, record.timed_out, record.decision, record.note, _digest(record.devices))
        record.counts, record.timed_out = decision.counts, decision.timed_out
        record.devices = {d: o.to_json() for d, o in decision.devices.items()}
        record.decision, record.note = decision.action, decision.reason
        result = None
        if decision.action == "abort":
            result = _abort(repo, record, now, f"automatic abort: {decision.reason}")
        elif decision.action == "complete":
            result = complete_rollout(repo, record.group, record.model, record.id)
            _finish(record, "completed", now, decision.reason)
        elif decision.action == "advance":
            record.step += 1
            target = RolloutTarget(record.model, record.to_version, record.to_files)
            result = publish_rollout_step(repo, record.group, target, record.id, record.percent, record.salt,
                                          record.from_version)
            record.step_started_at = now
            record.history.append({"at": now, "event": "step", "step": record.step + 1, "percent": record.percent,
                                   "serial": result.serial})
            log.info("rollout %s: step %d (%g %%) signed, serial %d", record.id, record.step + 1, record.percent,
                     result.serial)
        elif before == (record.counts, record.timed_out, record.decision, record.note, _digest(record.devices)):
            return record, decision, None  # nothing new: no write
        record.evaluated_at = now
        store.save(record)
        return record, decision, result


def pause(store: RolloutStore, rollout_id: str, now: float) -> RolloutRecord:
    return _change(store, rollout_id, now, "pause", lambda r: _set(r, "paused", "paused by the operator"))


def resume(store: RolloutStore, rollout_id: str, now: float) -> RolloutRecord:
    """Running again; the current step's wait and report deadline start afresh."""
    def go(record: RolloutRecord) -> None:
        _set(record, "running", None)
        record.step_started_at = now
        record.timed_out = []
    return _change(store, rollout_id, now, "resume", go)


def abort(repo: HubRepository, store: RolloutStore, rollout_id: str, now: float,
          reason: str = "aborted by the operator") -> tuple[RolloutRecord, PublishResult | None]:
    with store.lock():
        record = store.load(rollout_id)
        if record.done:
            raise HubError(f"rollout {rollout_id} is already {record.state}")
        result = _abort(repo, record, now, reason)
        store.save(record)
        return record, result


def _abort(repo: HubRepository, record: RolloutRecord, now: float, reason: str) -> PublishResult | None:
    try:
        result: PublishResult | None = abort_rollout(repo, record.group, record.model, record.id)
    except HubError as exc:
        state = current_desired(repo, "group", record.group)
        entry = state.models.get(record.model) if state else None
        if entry is not None and entry.rollout is not None and entry.rollout.id == record.id:
            raise
        log.warning("rollout %s: %s; recorded as aborted without signing", record.id, exc)
        result = None
    _finish(record, "aborted", now, reason)
    log.warning("rollout %s aborted: %s", record.id, reason)
    return result


def _finish(record: RolloutRecord, state: str, now: float, reason: str | None) -> None:
    _set(record, state, reason)
    record.finished_at = now
    record.history.append({"at": now, "event": state, "reason": reason})


def _set(record: RolloutRecord, state: str, reason: str | None) -> None:
    record.state = state  # type: ignore[assignment]
    record.reason = reason


def _change(store: RolloutStore, rollout_id: str, now: float, event: str,
            change: Callable[[RolloutRecord], None]) -> RolloutRecord:
    with store.lock():
        record = store.load(rollout_id)
        if record.done:
            raise HubError(f"rollout {rollout_id} is already {record.state}")
        if (event == "pause") == (record.state == "paused"):
            raise HubError(f"rollout {rollout_id} is {record.state} already")
        change(record)
        record.history.append({"at": now, "event": event})
        store.save(record)
        return record


def _digest(devices: Mapping[str, object]) -> int:
    return hash(repr(sorted(devices.items())))
