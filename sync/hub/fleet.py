"""The hub's view of the fleet, built from what devices publish on MQTT.

Three retained topics per device feed the rollout controller and `hub status`:
``state`` (birth / Last Will), ``reported`` (edgefleet.reported/1: desired vs
active per model, the last jobs, the update service's health) and ``update``
(edgefleet.update/1: job transitions). The fleet view page (sync/hub/view/) also
feeds it ``telemetry`` (edgefleet.telemetry/1, the latest record and the token rate
since the one before), ``alerts/{rule}`` (edgefleet.alert/1, the firing ones) and
the hub's own ``{prefix}/rollouts/{id}`` (edgefleet.rollout/1). `FleetView.ingest`
takes one message with the time the *hub* received it; nothing here reads a
device's own clock (its ``at`` fields) for a decision, so a device minutes ahead or
behind changes none.

A message that is not ours (another schema), malformed, larger than
`MAX_MESSAGE_BYTES`, on a topic that is not a device's, or naming another device
than its topic is ignored and counted in `FleetView.ignored` (by reason); it never
raises. Pure bookkeeping: no MQTT, no files.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson

from security.desired import NAME_RE

MAX_MESSAGE_BYTES = 64 * 1024
#: a rollout's status lists every device of its group: larger than a device's messages
MAX_ROLLOUT_BYTES = 1024 * 1024
SCHEMAS = {"state": "edgefleet.state/", "reported": "edgefleet.reported/", "update": "edgefleet.update/",
           "telemetry": "edgefleet.telemetry/"}
ALERT_SCHEMA = "edgefleet.alert/"
ROLLOUT_SCHEMA = "edgefleet.rollout/"
FAILED_STATES = frozenset({"failed", "rolled-back", "rejected"})


@dataclass
class DeviceView:
    """What the hub last heard from one device, and when (hub clock)."""

    device_id: str
    group: str | None = None
    online: bool | None = None
    #: hub clock: when the device was last seen to go online / offline
    online_since: float | None = None
    offline_since: float | None = None
    state: dict[str, Any] | None = None
    state_at: float | None = None
    reported: dict[str, Any] | None = None
    reported_at: float | None = None
    update: dict[str, Any] | None = None
    update_at: float | None = None
    #: the latest telemetry record, and tokens/s per model since the record before it (same run)
    telemetry: dict[str, Any] | None = None
    telemetry_at: float | None = None
    tokens_per_s: dict[str, float] = field(default_factory=dict)
    #: rule -> the firing edgefleet.alert/1 message (a resolved or cleared one is removed)
    alerts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def active(self, model: str) -> str | None:
        """The version serving now, from the newest of the reported and state messages."""
        reported = _dict(_dict(_dict(self.reported).get("models")).get(model))
        state = _dict(_dict(_dict(self.state).get("models")).get(model))
        if self.reported is not None and (self.state is None or (self.reported_at or 0) >= (self.state_at or 0)):
            return _str(reported.get("active"))
        if self.state is not None:
            return _str(state.get("version"))
        return _str(_dict(_dict(self.update).get("serving")).get(model))

    def desired(self, model: str) -> dict[str, Any] | None:
        """The reported desired entry of `model` (version, origin, rollout, serial), if any."""
        entry = _dict(_dict(_dict(self.reported).get("models")).get(model)).get("desired")
        return entry if isinstance(entry, dict) else None

    def job_outcome(self, model: str, version: str, min_serial: int) -> tuple[str, str | None, str | None] | None:
        """("failed" | "in-progress", code, message) for the job toward `model` `version` at
        or after group serial `min_serial`, or None when the device says nothing of it."""
        update = _dict(self.update)
        fresh = group_serial(update.get("serial")) >= min_serial
        if fresh and update.get("model") == model and update.get("version") == version:
            if update.get("state") in FAILED_STATES:
                return "failed", _str(update.get("code")) or str(update.get("state")), _str(update.get("message"))
            if update.get("state") != "active":
                return "in-progress", None, None
        reported = _dict(self.reported)
        if not reported:
            return None
        accepted = group_serial(_dict(reported.get("updates")).get("accepted_serial")) >= min_serial
        for denied in reported.get("denied") or []:
            if accepted and _dict(denied).get("model") == model and _dict(denied).get("version") == version:
                return "failed", _str(_dict(denied).get("code")) or "denied", None
        entry = _dict(_dict(reported.get("models")).get(model))
        desired = _dict(entry.get("desired"))
        told = desired.get("version") == version and _int(desired.get("serial")) >= min_serial
        if told and entry.get("job"):
            return "in-progress", None, None
        last = _dict(_dict(reported.get("jobs_last")).get(model))
        if told and last.get("version") == version and last.get("state") in FAILED_STATES:
            return "failed", _str(last.get("code")) or str(last.get("state")), _str(last.get("message"))
        return None


def group_serial(value: Any) -> int:
    """The group part of an accepted serial ``"<group>.<device>"`` (0 when unknown)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        head = value.split(".", 1)[0]
        if head.isdigit():
            return int(head)
    return 0


@dataclass
class FleetView:
    prefix: str = "edgefleet/v1"
    devices: dict[str, DeviceView] = field(default_factory=dict)
    #: rollout id -> its latest edgefleet.rollout/1 status (the hub's own topic)
    rollouts: dict[str, dict[str, Any]] = field(default_factory=dict)
    ignored: Counter[str] = field(default_factory=Counter)
    received: int = 0
    #: the topic of the last ignored message (for a count shown with an example; never its payload)
    last_ignored_topic: str | None = None

    def ingest(self, topic: str, payload: bytes, received_at: float) -> bool:
        """Take one message; False (and counted) when it is ignored."""
        self.received += 1
        reason = self._ingest(topic, payload, received_at)
        if reason is not None:
            self.ignored[reason] += 1
            self.last_ignored_topic = topic[:300]
            return False
        return True

    def _ingest(self, topic: str, payload: bytes, received_at: float) -> str | None:
        if topic.startswith(f"{self.prefix}/rollouts/"):
            return self._ingest_rollout(topic.removeprefix(f"{self.prefix}/rollouts/"), payload)
        head, _, rest = topic.partition(f"{self.prefix}/devices/") if topic.startswith(self.prefix) else ("", "", "")
        device_id, _, kind = rest.partition("/")
        alert_rule = kind.removeprefix("alerts/") if kind.startswith("alerts/") else None
        if alert_rule is not None:
            if not NAME_RE.match(device_id):
                return "unknown-device"
            return self._ingest_alert(device_id, alert_rule, payload)
        if head or kind not in SCHEMAS:
            return "other-topic"
        if not NAME_RE.match(device_id):
            return "unknown-device"
        if len(payload) > MAX_MESSAGE_BYTES:
            return "too-large"
        if not payload:  # a retained message cleared
            view = self.devices.get(device_id)
            if view is not None:
                setattr(view, kind, None)
            return None
        body, reason = _body(payload, SCHEMAS[kind], device_id)
        if body is None:
            return reason
        if kind in ("reported", "telemetry") and not isinstance(body.get("models", {}), dict):
            return "malformed"
        view = self.devices.setdefault(device_id, DeviceView(device_id))
        if body.get("group") is not None:
            view.group = body["group"]
        if kind == "telemetry":
            view.tokens_per_s = _token_rates(view.telemetry, body)
        setattr(view, kind, body)
        setattr(view, f"{kind}_at", received_at)
        if kind == "state" and isinstance(body.get("online"), bool):
            if body["online"] and view.online is not True:
                view.online_since = received_at
            elif not body["online"] and view.online is not False:
                view.offline_since = received_at
            view.online = body["online"]
        return None

    def _ingest_alert(self, device_id: str, rule: str, payload: bytes) -> str | None:
        if not NAME_RE.match(rule):
            return "other-topic"
        if len(payload) > MAX_MESSAGE_BYTES:
            return "too-large"
        view = self.devices.get(device_id)
        if not payload:  # the retained firing message cleared: resolved
            if view is not None:
                view.alerts.pop(rule, None)
            return None
        body, reason = _body(payload, ALERT_SCHEMA, device_id)
        if body is None:
            return reason
        if body.get("rule", rule) != rule or body.get("state") not in ("firing", "resolved"):
            return "malformed"
        view = view or self.devices.setdefault(device_id, DeviceView(device_id))
        if body["state"] == "firing":
            view.alerts[rule] = body
        else:
            view.alerts.pop(rule, None)
        return None

    def _ingest_rollout(self, rollout_id: str, payload: bytes) -> str | None:
        if not NAME_RE.match(rollout_id):
            return "other-topic"
        if len(payload) > MAX_ROLLOUT_BYTES:
            return "too-large"
        if not payload:
            self.rollouts.pop(rollout_id, None)
            return None
        body, reason = _body(payload, ROLLOUT_SCHEMA, None)
        if body is None:
            return reason
        if body.get("id") != rollout_id or not isinstance(body.get("plan"), dict):
            return "malformed"
        self.rollouts[rollout_id] = body
        return None


def _body(payload: bytes, schema_prefix: str, device_id: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """(the JSON object, None) or (None, why it is ignored)."""
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None, "malformed"
    if not isinstance(body, dict):
        return None, "malformed"
    schema = body.get("schema")
    if not isinstance(schema, str) or not schema.startswith(schema_prefix):
        return None, "not-ours"
    if device_id is not None:
        named = body.get("device_id", body.get("device"))
        if named is not None and named != device_id:
            return None, "other-device"
    group = body.get("group")
    if group is not None and (not isinstance(group, str) or not NAME_RE.match(group)):
        return None, "malformed"
    return body, None


def _token_rates(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, float]:
    """Tokens (prompt + generated) per second per model between two records of one run, by
    the device's own record times (a rate, so the device's clock offset cancels out)."""
    if not before or before.get("run_id") != after.get("run_id"):
        return {}
    t0, t1 = before.get("time"), after.get("time")
    if not isinstance(t0, int | float) or not isinstance(t1, int | float) or t1 <= t0:
        return {}
    rates = {}
    old_models = _dict(before.get("models"))
    for name, model in _dict(after.get("models")).items():
        old = _dict(old_models.get(name))
        now_tokens = _int(_dict(model).get("prompt_tokens")) + _int(_dict(model).get("generated_tokens"))
        old_tokens = _int(old.get("prompt_tokens")) + _int(old.get("generated_tokens"))
        if old and now_tokens >= old_tokens:
            rates[name] = round((now_tokens - old_tokens) / (t1 - t0), 3)
    return rates


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
