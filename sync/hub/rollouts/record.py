"""The rollout record: what an operator started, where it stands and why it stopped.

One JSON file per rollout (``<hub>/rollouts/<id>.json``, sync/hub/rollouts/store.py).
It holds only what cannot be read back from elsewhere: the plan (steps, wait,
threshold), the current step and when it started on the hub's clock, and the last
evaluation (counts per state, the failing devices) for `hub rollout status` to
show. The signed group state says the same share (`security.desired.Rollout`);
the record is what the controller acts on after a restart.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ...errors import HubError

SCHEMA = "edgefleet.rollout/1"
RolloutState = Literal["running", "paused", "completed", "aborted"]
#: Outcome of one device in a rollout (docs/operations.md, "Staged rollouts").
OUTCOMES = ("pending", "in-progress", "succeeded", "failed", "no-report", "offline", "unexpected")


@dataclass
class Plan:
    """What the operator asked for; checked once, at start."""

    steps: list[float]
    wait_s: float
    max_failure_ratio: float
    min_devices: int
    report_deadline_s: float

    def check(self) -> None:
        if not self.steps:
            raise HubError("--steps: give at least one percentage, e.g. 1,10,50,100")
        if any(not math.isfinite(s) or not 0 < s <= 100 for s in self.steps):
            raise HubError("--steps: every percentage must be above 0 and at most 100")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise HubError("--steps: percentages must increase, e.g. 1,10,50,100")
        if self.steps[-1] != 100:
            raise HubError("--steps: the last step must be 100 (the whole group)")
        if not math.isfinite(self.wait_s) or self.wait_s < 0:
            raise HubError("--wait must be 0 or more")
        if not math.isfinite(self.max_failure_ratio) or not 0 <= self.max_failure_ratio < 1:
            raise HubError("--max-failure-ratio must be at least 0 and below 1, e.g. 0.1")
        if self.min_devices < 1:
            raise HubError("--min-devices must be at least 1")
        if not math.isfinite(self.report_deadline_s) or self.report_deadline_s <= 0:
            raise HubError("--report-deadline must be above 0")


@dataclass
class RolloutRecord:
    id: str
    group: str
    model: str
    from_version: str
    to_version: str
    to_files: dict[str, str]
    plan: Plan
    salt: str
    #: the group state serial the rollout started at (every step's rollout entry carries it)
    serial: int
    state: RolloutState = "running"
    step: int = 0
    #: hub clock (Unix s): when the current step was signed (a resume starts it again)
    step_started_at: float = 0.0
    created_at: float = 0.0
    finished_at: float | None = None
    #: why it stopped (or paused): a sentence
    reason: str | None = None
    #: devices that missed a report deadline: they count as failed until they report
    timed_out: list[str] = field(default_factory=list)
    #: the last evaluation: counts per outcome, and devices per outcome
    counts: dict[str, int] = field(default_factory=dict)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: steps signed, abort, completion, pause, resume: [{"at", "event", ...}]
    history: list[dict[str, Any]] = field(default_factory=list)
    #: the last evaluation's decision (advance | wait | complete | abort) and why
    decision: str | None = None
    note: str | None = None
    #: hub clock: when the controller last evaluated it
    evaluated_at: float | None = None

    @property
    def percent(self) -> float:
        return self.plan.steps[self.step]

    @property
    def done(self) -> bool:
        return self.state in ("completed", "aborted")

    def to_json(self) -> bytes:
        body = {"schema": SCHEMA, **asdict(self)}
        return json.dumps(body, indent=1, sort_keys=True).encode()

    def status_body(self) -> dict[str, Any]:
        """What `hub rollout status ID --json` prints (less the controller's counters) and the
        ``{prefix}/rollouts/{id}`` topic carries (sync/hub/rollouts/topic.py): the record, the
        current share and the failing devices."""
        body: dict[str, Any] = json.loads(self.to_json())
        body["percent"] = self.percent
        body["failing"] = {d: o for d, o in self.devices.items()
                           if o.get("outcome") in ("failed", "no-report", "unexpected")}
        return body

    @classmethod
    def from_json(cls, data: bytes) -> RolloutRecord:
        try:
            body = json.loads(data)
            if body.pop("schema", None) != SCHEMA:
                raise ValueError(f"not {SCHEMA}")
            body["plan"] = Plan(**body["plan"])
            return cls(**body)
        except (ValueError, TypeError, KeyError) as exc:
            raise HubError(f"unreadable rollout record: {exc}") from None
