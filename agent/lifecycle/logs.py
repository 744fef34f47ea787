"""Log lines that journald keeps and people and tools can read: logfmt, rate-limited.

Each record is one line, ``level=info logger=runtime.registry msg="model x ready"
model=x``, with any ``extra={...}`` fields appended as ``key=value``. Under
systemd (``$JOURNAL_STREAM`` names our stderr) the line starts with a ``<N>``
syslog priority prefix, which journald turns into the entry's PRIORITY (so
``journalctl -p warning`` works), and has no timestamp (journald adds its own).
A traceback, logged only for errors nobody expected, stays inside the one line
(newlines escaped), so one failure is one journal entry.

Repeated messages are rate-limited: an attacker (or a broken client in a loop)
can make the agent log the same line thousands of times a second (accept errors
when descriptors run out, refused connections, malformed requests). On a device
with a small disk and no operator, that log is itself the outage.
`RateLimitFilter` lets each distinct message (logger, level, format string)
through `burst` times per `interval_s`, drops the rest, and says how many it
dropped on the next line it lets through.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, TextIO

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

#: syslog priorities (sd-daemon(3)) by logging level.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def _value(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\\n\t') and text.isprintable():
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    """One logfmt line per record; `journald` adds the priority prefix and drops the time."""

    def __init__(self, journald: bool = False) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if not self.journald:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            parts.append(f"time={stamp}.{int(record.msecs):03d}")
        parts += [f"level={record.levelname.lower()}", f"logger={record.name}",
                  f"msg={_value(record.getMessage())}"]
        parts += [f"{key}={_value(value)}" for key, value in vars(record).items()
                  if key not in _STANDARD and not key.startswith("_")]
        if record.exc_info:
            parts.append(f"exc={_value(self.formatException(record.exc_info))}")
        line = " ".join(parts)
        if self.journald:
            level = max((lvl for lvl in _PRIORITY if lvl <= record.levelno), default=logging.DEBUG)
            line = f"<{_PRIORITY[level]}>{line}"
        return line


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


def stream_is_journal(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """Whether `stream` is the journal stream systemd connected us to (systemd.exec(5))."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return bool(inode) and f"{st.st_dev}:{st.st_ino}" == f"{device}:{inode}"


def setup_logging(level: str, stream: TextIO | None = None, burst: int = 10, interval_s: float = 60.0) -> None:
    """Route every logger to `stream` (stderr) as logfmt, each distinct message at most
    `burst` times per `interval_s`; call again to change the level."""
    stream = stream or sys.stderr
    root = logging.getLogger()
    root.setLevel(level.upper())
    if not any(getattr(h, "_edgefleet", False) for h in root.handlers):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(LogfmtFormatter(journald=stream_is_journal(stream)))
        handler.addFilter(RateLimitFilter(burst, interval_s))
        handler._edgefleet = True  # type: ignore[attr-defined]
        root.addHandler(handler)
