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
`RateLimitFilter` lets each distinct line (logger, level, the message with its
arguments) through `burst` times per `interval_s`, and each format string at most
ten times that, whatever its arguments; it drops the rest and says how many it
dropped on the next line it lets through. Keying on the arguments matters: a
flood of one refusal must not hide the first refusal of another code or model.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
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


@dataclass
class _Window:
    """Records let through and dropped since `start`; `owed`: drops of past windows not yet said."""

    start: float
    passed: int = 0
    dropped: int = 0
    owed: int = 0


class RateLimitFilter(logging.Filter):
    """At most `burst` records of each kind per `interval_s`, and at most `template_burst` per
    format string (whatever its arguments); the rest are counted.

    A kind is what the line says (logger, level, the formatted message): ten ``update refused``
    lines of one code do not hide the first refusal of another code or model. The per-template
    cap is there because arguments can come from outside (a serial in a forged doorbell, a
    client's address): an attacker who varies them still cannot flood the log."""

    def __init__(self, burst: int = 10, interval_s: float = 60.0, template_burst: int | None = None) -> None:
        super().__init__()
        self.burst = burst
        self.interval_s = interval_s
        self.template_burst = template_burst if template_burst is not None else 10 * burst
        self._kinds: dict[tuple[str, int, str, str], _Window] = {}
        self._templates: dict[tuple[str, int, str], _Window] = {}

    def _window(self, table: dict[Any, _Window], key: Any, now: float) -> _Window:
        window = table.get(key)
        if window is None:
            window = table[key] = _Window(now)
            if len(table) > 10_000:  # bounded: forget the oldest windows
                for old in sorted(table, key=lambda k: table[k].start)[:5_000]:
                    del table[old]
        elif now - window.start >= self.interval_s:
            window.owed += window.dropped
            window.start, window.passed, window.dropped = now, 0, 0
        return window

    def filter(self, record: logging.LogRecord) -> bool:
        template = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        kind = self._window(self._kinds, (*template, record.getMessage()), now)
        shared = self._window(self._templates, template, now)
        if kind.passed >= self.burst:
            kind.dropped += 1
            return False
        if shared.passed >= self.template_burst:
            shared.dropped += 1
            return False
        kind.passed += 1
        shared.passed += 1
        suppressed = kind.owed + shared.owed
        kind.owed = shared.owed = 0
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} similar messages suppressed)"
        return True


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
