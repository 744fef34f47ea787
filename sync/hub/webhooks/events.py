"""Which MQTT messages are fleet events, and the body each event is posted with.

Sources (docs/mqtt.md):

    {prefix}/devices/{id}/state          edgefleet.state/1   -> device.online, device.offline
    {prefix}/devices/{id}/update         edgefleet.update/1  -> update (every job transition)
    {prefix}/devices/{id}/alerts/{rule}  edgefleet.alert/1   -> alert.firing, alert.resolved
    {prefix}/rollouts/{id}               edgefleet.rollout/1 -> rollout.step, .paused, .resumed,
                                                                .completed, .aborted

Most of these are retained, and MQTT hands a retained message again at every subscribe,
and a QoS 1 message again after a lost ack. So each topic has a *memory* (a short string
kept by store.py in the same transaction as the events it led to): the device's last
presence, the last update and alert transitions seen, how many of a rollout's history
entries were posted. A message is an event only if the memory has not seen it: a hub
restart or a reconnect re-reads the retained messages and posts nothing twice, while a
change that happened while the hub was away (a newer retained message) is posted.

On the very first run there is no memory: the retained messages then only fill it (the
*baseline*), so starting webhooks on a running fleet does not post its whole history.

Pure bookkeeping: no MQTT, no SQLite, no clock but the `now` it is given. A message that
is not ours, malformed or too large is ignored with a reason, never raised.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from security.desired import NAME_RE

SCHEMA = "edgefleet.webhook/1"
MAX_DEVICE_MESSAGE = 64 * 1024
#: a rollout's status names every device of its group: allow more
MAX_ROLLOUT_MESSAGE = 4 * 1024 * 1024
#: transitions remembered per update or alert topic (repeats come back within a few)
RECENT = 32
SOURCE_SCHEMAS = {"state": "edgefleet.state/", "update": "edgefleet.update/", "alerts": "edgefleet.alert/",
                  "rollouts": "edgefleet.rollout/"}
ROLLOUT_EVENTS = {"step": "rollout.step", "pause": "rollout.paused", "resume": "rollout.resumed",
                  "completed": "rollout.completed", "aborted": "rollout.aborted"}


@dataclass(frozen=True)
class Event:
    """One event to post: its id (receivers deduplicate on it), kind and the JSON body."""

    id: str
    kind: str
    body: bytes


@dataclass
class Derived:
    events: list[Event] = field(default_factory=list)
    #: the topic's new memory (None: unchanged)
    remember: str | None = None
    #: why the message was ignored (counted by the service), None if it was read
    ignored: str | None = None


def topic_filters(prefix: str) -> list[str]:
    return [f"{prefix}/devices/+/state", f"{prefix}/devices/+/update", f"{prefix}/devices/+/alerts/+",
            f"{prefix}/rollouts/+"]


def derive(prefix: str, topic: str, payload: bytes, memory: str | None, baseline: bool, now: float) -> Derived:
    """The events in one message. `memory` is what the topic's last message left; `baseline`:
    fill the memory only (a retained message on the first run)."""
    if not topic.startswith(prefix + "/"):
        return Derived(ignored="other-topic")
    parts = topic[len(prefix) + 1:].split("/")
    if len(parts) == 2 and parts[0] == "rollouts":
        kind, owner, rule = "rollouts", parts[1], None
    elif len(parts) == 3 and parts[0] == "devices" and parts[2] in ("state", "update"):
        kind, owner, rule = parts[2], parts[1], None
    elif len(parts) == 4 and parts[0] == "devices" and parts[2] == "alerts":
        kind, owner, rule = "alerts", parts[1], parts[3]
    else:
        return Derived(ignored="other-topic")
    if not NAME_RE.match(owner) or (rule is not None and not NAME_RE.match(rule)):
        return Derived(ignored="bad-name")
    if not payload:  # a retained message cleared (a resolved alert's, a deleted rollout's)
        return Derived()
    if len(payload) > (MAX_ROLLOUT_MESSAGE if kind == "rollouts" else MAX_DEVICE_MESSAGE):
        return Derived(ignored="too-large")
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return Derived(ignored="malformed")
    if not isinstance(body, dict):
        return Derived(ignored="malformed")
    schema = body.get("schema")
    if not isinstance(schema, str) or not schema.startswith(SOURCE_SCHEMAS[kind]):
        return Derived(ignored="not-ours")
    named = body.get("id") if kind == "rollouts" else body.get("device_id", body.get("device"))
    if named is not None and named != owner:
        return Derived(ignored="other-owner")
    if rule is not None and body.get("rule") != rule:
        return Derived(ignored="other-owner")
    try:
        if kind == "state":
            return _state(topic, owner, body, memory, baseline, now)
        if kind == "update":
            return _transition(topic, owner, body, memory, baseline, now, "update",
                               f"{body.get('seq')}:{body.get('job')}:{body.get('state')}")
        if kind == "alerts":
            state = body.get("state")
            if state not in ("firing", "resolved"):
                return Derived(ignored="malformed")
            return _transition(topic, owner, body, memory, baseline, now, f"alert.{state}",
                               f"{state}:{body.get('since')}")
        return _rollout(topic, owner, body, memory, baseline, now)
    except (TypeError, ValueError):  # a field of the wrong kind somewhere deep
        return Derived(ignored="malformed")


def _state(topic: str, device: str, body: dict[str, Any], memory: str | None, baseline: bool,
           now: float) -> Derived:
    online = body.get("online")
    if not isinstance(online, bool):
        return Derived(ignored="malformed")
    presence = "online" if online else "offline"
    if presence == memory:
        return Derived()
    if baseline:
        return Derived(remember=presence)
    extra = {"reason": body.get("reason")} if not online else {}
    return Derived([_event(f"device.{presence}", now, topic, body, device=device, group=body.get("group"),
                           **extra)], remember=presence)


def _transition(topic: str, device: str, body: dict[str, Any], memory: str | None, baseline: bool, now: float,
                kind: str, fingerprint: str) -> Derived:
    recent = _recent(memory)
    if fingerprint in recent:
        return Derived()
    remember = orjson.dumps([*recent, fingerprint][-RECENT:]).decode()
    if baseline:
        return Derived(remember=remember)
    if kind == "update":
        fields = {k: body.get(k) for k in ("model", "version", "from_version", "state", "code")}
    else:
        fields = {k: body.get(k) for k in ("rule", "state", "severity", "value", "threshold")}
    return Derived([_event(kind, now, topic, body, device=device, group=body.get("group"), **fields)],
                   remember=remember)


def _rollout(topic: str, rollout: str, body: dict[str, Any], memory: str | None, baseline: bool,
             now: float) -> Derived:
    history = body.get("history")
    if not isinstance(history, list):
        return Derived(ignored="malformed")
    posted = int(memory) if memory and memory.isdigit() else 0
    if len(history) <= posted:
        return Derived()
    if baseline:
        return Derived(remember=str(len(history)))
    events = []
    for entry in history[posted:]:
        kind = ROLLOUT_EVENTS.get(str(entry.get("event"))) if isinstance(entry, dict) else None
        if kind is None:
            continue  # an event of a later edgefleet.rollout/1: not ours to name
        fields = {k: body.get(k) for k in ("group", "model", "from_version", "to_version", "state")}
        fields |= {"step": entry.get("step"), "percent": entry.get("percent"), "reason": entry.get("reason")}
        events.append(_event(kind, now, topic, body, rollout=rollout, **fields))
    return Derived(events, remember=str(len(history)))


def _recent(memory: str | None) -> list[str]:
    if not memory:
        return []
    try:
        value = orjson.loads(memory)
    except orjson.JSONDecodeError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def _event(kind: str, now: float, topic: str, data: dict[str, Any], **fields: Any) -> Event:
    event_id = uuid.uuid4().hex
    body = {"schema": SCHEMA, "id": event_id, "event": kind, "at": now, **fields, "topic": topic, "data": data}
    return Event(event_id, kind, orjson.dumps(body))
