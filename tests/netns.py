"""Devices with a network of their own, on this one machine: Linux network namespaces.

One loopback cannot show a device whose link goes down in the middle of a download,
or one on a slow uplink: every process shares it, and it never fails. Here each
device is a network namespace joined to the host by a veth pair on a private /30
(10.201.x.y: the pairs stay inside the machine; nothing is routed to a real
interface). The host end carries the broker's and the hub's listeners; the device
end is the only interface the device has besides its own loopback. What a test does
to the link is what the kernel does to a real one: `link(False)` takes the device's
interface down (its route goes with it), `shape()` puts a real queueing discipline
on it (netem delay and rate where the kernel has netem, else a token bucket).

Names carry this process's id (``edgefleet-t<pid>-<n>``), so runs side by side do not
collide, and `namespaces()` deletes what it made even when the test fails; what a
killed run left behind (its pid gone) is deleted by the next run. Needs root
(CAP_NET_ADMIN) and iproute2; `unavailable()` says precisely why not, for a skip.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiohttp import web
from update_env import Mirror

IP = shutil.which("ip") or "/usr/sbin/ip"
TC = shutil.which("tc") or "/usr/sbin/tc"
PREFIX = "edgefleet-t"
NAME_RE = re.compile(rf"^{PREFIX}(\d+)-\d+$")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """One iproute2 command; with `check`, a failure raises with what it printed."""
    result = subprocess.run(args, check=False, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def unavailable(euid: int | None = None, ip: str | None = IP) -> str | None:
    """Why this machine cannot give a test network namespaces (None: it can)."""
    if (os.geteuid() if euid is None else euid) != 0:
        return "network namespaces need root (CAP_NET_ADMIN for ip netns add and veth pairs); running as a user"
    if ip is None or not os.access(ip, os.X_OK):
        return "iproute2's ip is not installed (apt-get install iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    added = run(ip, "netns", "add", probe, check=False)
    if added.returncode != 0:
        return f"ip netns add failed: {added.stderr.strip() or added.returncode}"
    run(ip, "netns", "delete", probe, check=False)
    return None


def netem_available() -> bool:
    """Whether the kernel has sch_netem (delay, loss); many small VM kernels leave it out."""
    probe = f"{PREFIX}{os.getpid()}-netem"
    run(IP, "netns", "add", probe)
    try:
        added = run(IP, "netns", "exec", probe, TC, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                    check=False)
        return added.returncode == 0
    finally:
        run(IP, "netns", "delete", probe, check=False)


@dataclass
class Netns:
    """One device's network: namespace `name`, `dev_if` inside it (`dev_ip`), `host_if` outside (`host_ip`)."""

    name: str
    host_if: str
    dev_if: str
    host_ip: str
    dev_ip: str
    shaped: list[str] = field(default_factory=list)

    def command(self, *argv: str) -> list[str]:
        """`argv` run inside the namespace (for Popen): its only network is the veth and its loopback."""
        return [IP, "netns", "exec", self.name, *argv]

    def link(self, up: bool) -> None:
        """The device's interface up or down: down, the device has no route to anything but itself."""
        run(*self.command(IP, "link", "set", self.dev_if, "up" if up else "down"))

    def shape(self, rate: str, delay_ms: int = 0, netem: bool = True) -> str:
        """Both directions of the link at `rate` (tc's units: 2mbit) and, with netem, `delay_ms` each
        way; returns the qdisc as tc was given it, for the test's report."""
        if netem:
            qdisc = ["netem", "delay", f"{delay_ms}ms", "rate", rate, "limit", "10000"]
        else:  # a token bucket: the rate without the delay
            qdisc = ["tbf", "rate", rate, "burst", "32kbit", "latency", "2s"]
        run(TC, "qdisc", "replace", "dev", self.host_if, "root", *qdisc)  # hub and broker -> device
        run(*self.command(TC, "qdisc", "replace", "dev", self.dev_if, "root", *qdisc))  # device -> host
        self.shaped = qdisc
        return " ".join(qdisc)

    def unshape(self) -> None:
        if self.shaped:
            run(TC, "qdisc", "del", "dev", self.host_if, "root", check=False)
            run(*self.command(TC, "qdisc", "del", "dev", self.dev_if, "root"), check=False)
            self.shaped = []


def _delete(name: str, host_if: str | None = None) -> None:
    """Deleting the namespace destroys the veth end inside it, and with it the host end."""
    run(IP, "netns", "delete", name, check=False)
    if host_if is not None:
        run(IP, "link", "delete", host_if, check=False)


def remove_leftovers() -> list[str]:
    """Namespaces a killed run left (their pid is gone): deleted; returns their names."""
    listed = run(IP, "netns", "list", check=False).stdout
    gone = []
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        match = NAME_RE.match(name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            _delete(name)
            gone.append(name)
    return gone


@contextlib.contextmanager
def namespaces(count: int) -> Iterator[list[Netns]]:
    """`count` device networks, each a /30 of its own; all deleted on the way out, whatever happened."""
    pid = os.getpid()
    remove_leftovers()
    made: list[Netns] = []
    try:
        for i in range(count):
            base = f"10.201.{pid % 250}"
            ns = Netns(f"{PREFIX}{pid}-{i}", f"efh{pid % 100000}x{i}", f"efd{pid % 100000}x{i}",
                       f"{base}.{4 * i + 1}", f"{base}.{4 * i + 2}")
            run(IP, "netns", "add", ns.name)
            made.append(ns)
            run(IP, "link", "add", ns.host_if, "type", "veth", "peer", "name", ns.dev_if)
            run(IP, "link", "set", ns.dev_if, "netns", ns.name)
            run(IP, "addr", "add", f"{ns.host_ip}/30", "dev", ns.host_if)
            run(IP, "link", "set", ns.host_if, "up")
            run(*ns.command(IP, "addr", "add", f"{ns.dev_ip}/30", "dev", ns.dev_if))
            run(*ns.command(IP, "link", "set", "lo", "up"))
            ns.link(True)
        yield made
    finally:
        for ns in made:
            _delete(ns.name, ns.host_if)


@dataclass
class HostMirror(Mirror):
    """update_env's `Mirror` (the hub's files, counted, misbehaving on demand) listening on
    one host address: the host end of one device's veth, so what it counts is that device's."""

    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{path:.+}", self._handle)
        self.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port).start()
