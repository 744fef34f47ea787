"""Reporting update transitions: its own queue and retry loop.

The update state machine hands each transition to `Reporter.report` and goes
on; this loop publishes them, in order, on the device's update topic (QoS 1,
retained, so the last one is the device's update state for whoever looks
later). A broker that is away or refuses a message delays reports; it never
changes what is installed (a Mender bug once rolled back good updates because
a status report failed). Reports wait in memory, at most `limit` of them; the
oldest go first when a long outage fills it, and the journal keeps the last
state of each model for after a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]


class Reporter:
    def __init__(self, topic: str, publish: Publish | None, limit: int = 1000, max_backoff_s: float = 30.0) -> None:
        self.topic = topic
        self._publish = publish
        self._queue: deque[bytes] = deque(maxlen=limit)
        self._wake = asyncio.Event()
        self._max_backoff_s = max_backoff_s
        self.sent = 0
        self.failures = 0

    def report(self, payload: dict[str, Any]) -> None:
        self._queue.append(orjson.dumps(payload))
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def run(self) -> None:
        backoff = 0.5
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue and self._publish is not None:
                message = self._queue[0]
                try:
                    await self._publish(self.topic, message)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any failure to send is retried, never fatal
                    self.failures += 1
                    log.warning("update report not sent (%s); retrying in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self._max_backoff_s)
                    continue
                backoff = 0.5
                if self._queue and self._queue[0] is message:
                    self._queue.popleft()
                self.sent += 1
