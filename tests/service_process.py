"""`edgefleet serve` as systemd runs it: a real process, its own notify socket, signals.

The test binds the datagram socket systemd would ($NOTIFY_SOCKET), and a thread
records every message with the time it came, so a test can ask "had READY=1
arrived when /readyz first said 200?" or "how far apart were the WATCHDOG=1s?".
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

EDGEFLEET = [sys.executable, "-m", "agent"]


@dataclass(frozen=True)
class Notification:
    at: float
    fields: dict[str, str]


class NotifySocket:
    """What systemd's end of sd_notify sees: each datagram, parsed, with its arrival time."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[Notification] = []
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(Notification(time.monotonic(), fields))

    def with_key(self, key: str, value: str | None = None) -> list[Notification]:
        return [m for m in list(self.messages) if key in m.fields and (value is None or m.fields[key] == value)]

    def statuses(self) -> list[str]:
        return [m.fields["STATUS"] for m in self.with_key("STATUS")]

    async def wait_for(self, key: str, value: str | None = None, count: int = 1, timeout: float = 90) -> Notification:
        deadline = time.monotonic() + timeout
        while len(found := self.with_key(key, value)) < count:
            assert time.monotonic() < deadline, f"no {key}={value} within {timeout}s; got {self.messages[-5:]}"
            await asyncio.sleep(0.05)
        return found[count - 1]

    def close(self) -> None:
        self._closed = True
        self._thread.join()
        self.sock.close()


class ServiceProcess:
    """`edgefleet serve --config FILE` with a notify socket; stderr goes to a log file."""

    def __init__(self, config: Path, tmp_path: Path, watchdog_usec: int | None = None,
                 abstract_socket: bool = False, preexec_fn: object = None,
                 command: list[str] | None = None) -> None:
        address = f"@edgefleet-test-{os.getpid()}-{id(self)}" if abstract_socket else str(tmp_path / "notify.sock")
        self.notify = NotifySocket(address)
        self.log_path = tmp_path / "agent.log"
        env = {**os.environ, "NOTIFY_SOCKET": address, "EDGEFLEET_CONFIG": ""}
        env.pop("WATCHDOG_USEC", None)
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen([*(command or EDGEFLEET), "serve", "--config", str(config)], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=preexec_fn)  # type: ignore[arg-type]  # noqa: PLW1509 - prctl before exec

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.proc.poll()) is None:
            assert time.monotonic() < deadline, f"agent still running {timeout}s after the signal"
            await asyncio.sleep(0.05)
        return code

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        self.notify.close()


def write_config(path: Path, state_dir: Path, port: int, models: list[str], api_key: str | None = None,
                 drain_timeout_s: float = 30.0, extra: str = "") -> Path:
    lines = [f'state_dir = "{state_dir}"', extra, "[server]", 'host = "127.0.0.1"', f"port = {port}",
             f"drain_timeout_s = {drain_timeout_s}"]
    if api_key:
        lines.append(f'api_key = "{api_key}"')
    for name in models:
        lines += ["[[models]]", f'name = "{name}"']
    path.write_text("\n".join(lines) + "\n")
    return path


PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1


def deny_write_execute() -> None:
    """In a child before exec: the kernel's form of systemd's MemoryDenyWriteExecute=yes."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


def kernel_has_mdwe() -> bool:
    return ctypes.CDLL(None, use_errno=True).prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0
