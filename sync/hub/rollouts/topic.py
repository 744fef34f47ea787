"""Rollouts on MQTT: ``{prefix}/rollouts/{id}``, retained, QoS 1, schema edgefleet.rollout/1.

The body is what `edgefleet hub rollout status ID --json` prints
(`RolloutRecord.status_body`) plus ``"at"`` (hub clock, when it was published); the
controller's own counters are left out, so the message changes only when the rollout
does. The rollout controller publishes every change it sees in the records (its own
and the CLI's: `RolloutPublisher`), and the CLI's start / pause / resume / abort
publish at once (`publish_rollout`) so a page or webhook hears of them without
waiting for the controller. Consumers: the fleet view page (sync/hub/view/) and the
webhooks. The records on disk stay the truth; the topic is a copy for readers.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from ..mqtt_tools import Broker, ring_doorbell
from .record import RolloutRecord


def rollout_topic(prefix: str, rollout_id: str) -> str:
    return f"{prefix}/rollouts/{rollout_id}"


def rollout_body(record: RolloutRecord) -> dict[str, Any]:
    """The message's body without its ``at`` (what a change is judged on)."""
    return record.status_body()


def rollout_message(body: dict[str, Any], at: float | None = None) -> bytes:
    return orjson.dumps(body | {"at": round(time.time() if at is None else at, 3)}, option=orjson.OPT_SORT_KEYS)


def publish_rollout(broker: Broker, prefix: str, record: RolloutRecord, timeout_s: float = 10.0) -> str:
    """Publish one rollout's status, retained, and wait for the broker's ack (the CLI's
    one-shot). Returns the topic; raises `HubUnreachable`."""
    topic = rollout_topic(prefix, record.id)
    ring_doorbell(broker, topic, rollout_message(rollout_body(record)), timeout_s)
    return topic


class RolloutPublisher:
    """The controller's side: which body each rollout's retained message carries now, so
    only changes are published; `forget()` after a reconnect publishes all again (a broker
    that restarted without its store has lost the retained copies)."""

    def __init__(self) -> None:
        self._sent: dict[str, dict[str, Any]] = {}

    def changed(self, records: list[RolloutRecord]) -> list[tuple[str, dict[str, Any]]]:
        """(rollout id, body) of every record whose body differs from the last one sent."""
        out = []
        for record in records:
            body = rollout_body(record)
            if self._sent.get(record.id) != body:
                out.append((record.id, body))
        return out

    def sent(self, rollout_id: str, body: dict[str, Any]) -> None:
        self._sent[rollout_id] = body

    def forget(self) -> None:
        self._sent.clear()
