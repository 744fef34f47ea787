"""Logging set-up for `edgefleet serve`, with repeated messages rate-limited.

Why: an attacker (or a broken client in a loop) can make the agent log the same
line thousands of times a second: accept errors when descriptors run out,
refused connections, malformed requests. On a device with a small disk and no
operator, that log is itself the outage. `RateLimitFilter` lets each distinct
message (logger, level, format string) through `burst` times per `interval_s`,
drops the rest, and says how many it dropped on the next line it lets through.
"""

from __future__ import annotations

import logging
import sys
import time

#: The format every line of the agent's log has.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RateLimitFilter(logging.Filter):
    """At most `burst` records per distinct message per `interval_s`; the rest are counted."""

    def __init__(self, burst: int = 10, interval_s: float = 60.0) -> None:
        super().__init__()
        self.burst = burst
        self.interval_s = interval_s
        #: message key -> [window start, records let through in it, records dropped]
        self._windows: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.interval_s:
            dropped = int(window[2]) if window is not None else 0
            self._windows[key] = [now, 1, 0]
            if len(self._windows) > 10_000:  # bounded: forget the oldest windows
                for old in sorted(self._windows, key=lambda k: self._windows[k][0])[:5_000]:
                    del self._windows[old]
            if dropped:
                record.msg = f"{record.msg} ({dropped} similar messages suppressed)"
            return True
        if window[1] < self.burst:
            window[1] += 1
            return True
        window[2] += 1
        return False


def configure_logging(level: str, burst: int = 10, interval_s: float = 60.0) -> None:
    """Log to stderr (journald takes it from there), each message at most `burst` times
    per `interval_s`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RateLimitFilter(burst, interval_s))
    logging.basicConfig(level=level.upper(), handlers=[handler])
