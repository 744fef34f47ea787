"""The sd_notify protocol: tell systemd how the service is doing.

systemd's protocol is one datagram of ``KEY=value`` lines sent to the socket
named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for Linux's abstract
namespace). It is small enough that a client is a dozen lines; the C library
(libsystemd, via systemd-python) would add a compiled dependency to every edge
device for this alone. Outside systemd (no ``$NOTIFY_SOCKET``) every call is a
no-op, so the same code runs under a shell, a container or a test.

What to send and when (READY once the models answer, the watchdog from the
event loop) is agent/lifecycle/service.py's business; this module only speaks the protocol.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """A client of one notify socket; the address is read from the environment once."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._socket: socket.socket | None = None
        self._warned = False
        if self.address:
            if self.address[0] not in "/@":
                log.warning("NOTIFY_SOCKET=%s is neither a path nor an abstract socket; not notifying",
                            self.address)
                self.address = ""
            else:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, **fields: str | int) -> bool:
        """Send one message (``send(READY=1, STATUS="serving")``); False when it could not go."""
        if self._socket is None:
            return False
        payload = "\n".join(f"{key}={_one_line(str(value))}" for key, value in fields.items())
        # "@name" is the abstract namespace: a leading NUL byte on the wire.
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            self._socket.sendto(payload.encode(), target)
        except OSError as exc:
            if not self._warned:  # systemd went away or the socket is gone; say it once
                log.warning("cannot notify systemd at %s: %s", self.address, exc.strerror)
                self._warned = True
            return False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _one_line(value: str) -> str:
    # A newline would start a new KEY=value assignment.
    return value.replace("\n", " ")


def watchdog_interval_s(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3)
    advises; None when no watchdog is asked of this process (unset, or meant for another PID)."""
    environ = os.environ if environ is None else environ
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    watched_pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (watched_pid and watched_pid != str(os.getpid() if pid is None else pid)):
        return None
    return usec / 2 / 1_000_000
