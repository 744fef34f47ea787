"""A queue of messages waiting for the broker, bounded by count and by bytes.

While the broker is away, what the agent wants to say piles up in memory. A bound on
the count alone lets a thousand large messages hold a thousand times their size; so
the bound is on both (``[mqtt] send_queue_max_messages`` and ``send_queue_max_bytes``).
Past either, the *oldest* messages are dropped — what is queued is state reports,
whose newest one matters most — and every drop is counted (messages and bytes), so it
shows in /metrics and in telemetry rather than vanishing. A message larger than the
whole byte bound is dropped (and counted) at once. Loop-thread only; no locks.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

log = logging.getLogger(__name__)

@dataclass
class SendQueueStats:
    """One queue's figures, or (the link's `LinkStatus.send`) the sum over all its queues."""

    queued: int = 0
    queued_bytes: int = 0
    dropped: int = 0
    dropped_bytes: int = 0


class SendQueue:
    def __init__(self, max_messages: int, max_bytes: int, name: str = "send",
                 totals: SendQueueStats | None = None) -> None:
        """`totals` is kept in step with this queue's changes (the link's sum over its queues)."""
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("a send queue needs room for at least one message and one byte")
        self.name = name
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._messages: deque[bytes] = deque()
        self._bytes = 0
        self.dropped = 0
        self.dropped_bytes = 0
        self._totals = totals or SendQueueStats()

    def __len__(self) -> int:
        return len(self._messages)

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def stats(self) -> SendQueueStats:
        return SendQueueStats(len(self._messages), self._bytes, self.dropped, self.dropped_bytes)

    def append(self, message: bytes) -> None:
        """Queue `message` last, dropping the oldest while either bound is exceeded."""
        if len(message) > self.max_bytes:
            self._drop(1, len(message))
            log.warning("mqtt: a %d-byte %s message is larger than the whole send queue (%d bytes): dropped",
                        len(message), self.name, self.max_bytes)
            return
        self._messages.append(message)
        self._add(1, len(message))
        self._trim()

    def take(self) -> bytes | None:
        """The oldest message, out of the queue (None when empty): the one being sent."""
        if not self._messages:
            return None
        message = self._messages.popleft()
        self._add(-1, -len(message))
        return message

    def put_back(self, message: bytes) -> None:
        """Return a message whose sending failed to the front, to be sent first; if newer ones
        filled the queue meanwhile, it is the oldest and is dropped (counted)."""
        self._messages.appendleft(message)
        self._add(1, len(message))
        self._trim()

    def _trim(self) -> None:
        count = size = 0
        while len(self._messages) > self.max_messages or self._bytes > self.max_bytes:
            old = self._messages.popleft()
            self._add(-1, -len(old))
            count, size = count + 1, size + len(old)
        if count:
            if self.dropped == 0:  # the first time says why; the counters say how many after
                log.warning("mqtt: %s queue full (%d messages, %d bytes at most) while the broker is away: "
                            "dropping the oldest, counted in edgefleet_mqtt_send_dropped_messages_total",
                            self.name, self.max_messages, self.max_bytes)
            self._drop(count, size)

    def _add(self, count: int, size: int) -> None:
        self._bytes += size
        self._totals.queued += count
        self._totals.queued_bytes += size

    def _drop(self, count: int, size: int) -> None:
        self.dropped += count
        self.dropped_bytes += size
        self._totals.dropped += count
        self._totals.dropped_bytes += size
