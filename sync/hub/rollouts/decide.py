"""The rollout decision: advance, wait, complete or abort. Pure: no MQTT, no files, no clock.

`evaluate(record, fleet, now)` sorts every device of the group that the hub has
heard from into one outcome, then applies the rules (docs/operations.md,
"Staged rollouts"):

- A device is *in the step* iff ``bucket(salt, id) < steps[k]`` — what it works
  out itself from the signed group state (`security.desired.in_rollout`).
- In the step: *succeeded* when it serves the new version and its job is over (the
  health check runs after the switch); *failed* when its job
  toward it ended failed / rolled-back / rejected (or it denied the version);
  *no-report* when it is neither by ``report_deadline_s`` after the step started
  (a device that missed one deadline stays no-report in later steps until it
  reports); else *in-progress*, *offline* or *pending*.
- Out of the step: *unexpected* when it serves the new version anyway (flagged,
  never counted as a success).
- Abort (AWS IoT Jobs' abortConfig): failures = failed + no-report, decided =
  succeeded + failures; abort when failures / decided > max_failure_ratio once
  decided >= min_devices. A step with fewer than min_devices devices in all is
  judged the same way once every one of them is decided (at the latest at its
  deadline), so a small group can abort too. The rule is checked while paused.
- Advance when running, ``wait_s`` has passed since the step started and every
  device of the step is decided; after the last step, complete. A step with no
  device advances when its wait has passed.

Every time here is the hub's clock (`now`, `record.step_started_at`); a device's
own ``at`` fields are never read, so clock skew can neither stall nor skip a wait.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from security.desired import bucket

from ..fleet import DeviceView
from .record import OUTCOMES, RolloutRecord

Action = Literal["advance", "wait", "complete", "abort"]
UNDECIDED = ("pending", "in-progress", "offline")


@dataclass(frozen=True)
class DeviceOutcome:
    outcome: str
    in_step: bool
    active: str | None = None
    code: str | None = None
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"outcome": self.outcome, "in_step": self.in_step, "active": self.active}
        if self.code is not None:
            body["code"] = self.code
        if self.message is not None:
            body["message"] = self.message[:300]
        return body


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str | None
    counts: dict[str, int]
    devices: dict[str, DeviceOutcome] = field(default_factory=dict)
    #: devices that have missed a report deadline (carried into the next evaluation)
    timed_out: list[str] = field(default_factory=list)


def evaluate(record: RolloutRecord, fleet: Mapping[str, DeviceView], now: float) -> Decision:
    plan = record.plan
    percent = record.percent
    deadline_passed = now >= record.step_started_at + plan.report_deadline_s
    timed_out = set(record.timed_out)
    devices: dict[str, DeviceOutcome] = {}
    for device_id, view in sorted(fleet.items()):
        if view.group != record.group:
            continue
        in_step = percent >= 100 or bucket(record.salt, device_id) < percent
        active = view.active(record.model)
        if not in_step:
            if active == record.to_version:
                devices[device_id] = DeviceOutcome("unexpected", False, active, "unexpected-version",
                                                   f"serves {active} outside the rollout's {percent:g} %")
            continue
        devices[device_id] = _outcome(record, view, active, device_id, timed_out, deadline_passed)
    counts = Counter({name: 0 for name in OUTCOMES})
    counts.update(d.outcome for d in devices.values())
    counts_out = dict(counts) | {"in_step": sum(d.in_step for d in devices.values())}
    timed = sorted(timed_out)

    def decided(action: Action, reason: str | None) -> Decision:
        return Decision(action, reason, counts_out, devices, timed)

    failures = counts["failed"] + counts["no-report"]
    done = counts["succeeded"] + failures
    undecided = sum(counts[o] for o in UNDECIDED)
    needed = plan.min_devices if undecided else min(plan.min_devices, counts_out["in_step"])
    if done and done >= needed and failures / done > plan.max_failure_ratio:
        return decided("abort", f"{failures} of {done} devices failed ({failures / done:.0%} > "
                                f"{plan.max_failure_ratio:.0%}) at step {record.step + 1} ({percent:g} %)")
    if record.state != "running":
        return decided("wait", record.reason)
    if undecided:
        return decided("wait", f"{undecided} device(s) of step {record.step + 1} not done yet")
    waited = now - record.step_started_at
    if waited < plan.wait_s:
        return decided("wait", f"step {record.step + 1} waits {plan.wait_s - waited:.0f}s more")
    if record.step + 1 >= len(plan.steps):
        return decided("complete", f"all {counts_out['in_step']} devices done, {failures} failed")
    return decided("advance", f"step {record.step + 1} done: {counts['succeeded']} succeeded, {failures} failed")


def _outcome(record: RolloutRecord, view: DeviceView, active: str | None, device_id: str,
             timed_out: set[str], deadline_passed: bool) -> DeviceOutcome:
    job = view.job_outcome(record.model, record.to_version, record.serial)
    if job is not None and job[0] == "failed":
        timed_out.discard(device_id)
        return DeviceOutcome("failed", True, active, job[1], job[2])
    # serving it is not enough: the job's health check runs after the switch, and may roll back
    if active == record.to_version and (job is None or job[0] != "in-progress"):
        timed_out.discard(device_id)
        return DeviceOutcome("succeeded", True, active)
    if device_id in timed_out or deadline_passed:
        timed_out.add(device_id)
        return DeviceOutcome("no-report", True, active, "no-report",
                             f"not on {record.to_version} within {record.plan.report_deadline_s:g}s of its step")
    if job is not None:
        return DeviceOutcome("in-progress", True, active)
    if view.online is False:
        return DeviceOutcome("offline", True, active)
    return DeviceOutcome("pending", True, active)
