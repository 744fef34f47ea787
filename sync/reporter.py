"""Reporting update transitions: its own queue and retry loop.

The update state machine hands each transition to `Reporter.report` and goes
on; this loop publishes them, in order, on the device's update topic (QoS 1,
retained, so the last one is the device's update state for whoever looks
later). A broker that is away or refuses a message delays reports; it never
changes what is installed (a Mender bug once rolled back good updates because
a status report failed). Reports wait in memory in a `SendQueue`, bounded by
count and by bytes (the link's ``[mqtt] send_queue_max_*``); the oldest go first
when a long outage fills it, each drop counted, and the journal keeps the last
state of each model for after a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from .mqtt.send_queue import SendQueue

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]


class Reporter:
    def __init__(self, topic: str, publish: Publish | None, max_backoff_s: float = 30.0,
                 queue: SendQueue | None = None) -> None:
        """`queue`: where reports wait (`MqttLink.send_queue`); by default 1000 messages, 1 MiB."""
        self.topic = topic
        self._publish = publish
        self._queue = queue if queue is not None else SendQueue(1000, 1024 * 1024, "update report")
        self._in_flight: bytes | None = None
        self._wake = asyncio.Event()
        self._max_backoff_s = max_backoff_s
        self.sent = 0
        self.failures = 0

    def report(self, payload: dict[str, Any]) -> None:
        self._queue.append(orjson.dumps(payload))
        self._wake.set()

    @property
    def pending(self) -> int:
        """Reports not yet acknowledged: queued, and the one being sent."""
        return len(self._queue) + (self._in_flight is not None)

    async def run(self) -> None:
        backoff = 0.5
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._publish is not None and (message := self._queue.take()) is not None:
                self._in_flight = message
                failure: Exception | None = None
                try:
                    await self._publish(self.topic, message)
                except asyncio.CancelledError:
                    self._queue.put_back(message)
                    raise
                except Exception as exc:  # noqa: BLE001 - any failure to send is retried, never fatal
                    failure = exc
                finally:
                    self._in_flight = None
                if failure is not None:
                    self.failures += 1
                    self._queue.put_back(message)  # sent first next time, unless newer ones filled the queue
                    log.warning("update report not sent (%s); retrying in %.1fs", failure, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self._max_backoff_s)
                    continue
                backoff = 0.5
                self.sent += 1
