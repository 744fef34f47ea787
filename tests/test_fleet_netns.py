"""A fleet of three on one machine, each device on a network of its own (tests/netns.py).

Three real `edgefleet serve` processes, each inside its own network namespace, reach
the host only through their veth: a real mosquitto listens there, and the hub's
repository is served there (update_env's mirror, one listener per device network, so
what it counts is per device). What one shared loopback cannot show, the kernel does
to a device's link here:

- its interface goes down in the middle of a download: the job fails with
  ``hub-unreachable``, which reaches the broker once the link is back; the update then
  finishes, continuing the download where it stopped, while the others updated and serve;
- its link is slow (tc netem 200 ms and 2 Mbit/s, or a 2 Mbit/s token bucket on kernels
  without netem): its update still finishes inside the job deadline, its telemetry and
  state still arrive, and the other two reach ``active`` first;
- its link drops for less than MQTT's keepalive can notice (no reconnect), long enough
  for the download to give up: its timer check still brings the update to ``active``.

The agents serve only the ONNX embedding model (light to load). Needs root and iproute2;
skipped with the reason otherwise. Namespaces and veths are deleted however a test ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import netns
import pytest
from conftest import EMBED, free_port
from mqtt_broker import MosquittoBroker, Watcher
from netns import HostMirror, Netns
from update_env import (
    GROUP,
    GROUP_DOORBELL,
    PREFIX,
    UpdateLog,
    create_hub,
    embedding_state,
    make_release,
    publish_release,
    target_file,
)

from runtime.store import ModelStore
from sync.hub.repository import HubRepository

REPO = Path(__file__).resolve().parent.parent
V1 = "int8-1.0.0"
DEVICES = ("fleet-a", "fleet-b", "fleet-c")
JOB_TIMEOUT_S = 120
QUIET = "fleet-c"  # keeps MQTT's default keepalive and checks the hub every few seconds
CHECK_INTERVAL_S = 3
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nets() -> Iterator[list[Netns]]:
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    with netns.namespaces(len(DEVICES)) as made:
        yield made


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = embedding_state(tmp_path_factory.mktemp("fleet"))
    shutil.copytree(ModelStore(root / "state").version_path(EMBED, V1), root / "v1")  # old versions get pruned
    for device in DEVICES:
        shutil.copytree(root / "state", root / device, symlinks=True)
    return root


@pytest.fixture(scope="module")
def hub(env: Path) -> HubRepository:
    return create_hub(env / "hub", env / "state", (EMBED,))


@pytest.fixture(scope="module")
def broker(env: Path, nets: list[Netns]) -> Iterator[MosquittoBroker]:
    """One mosquitto for the fleet, on loopback (for the test's watcher) and on each veth's host end."""
    port = free_port()
    listeners = "".join(f"listener {port} {host}\n" for host in ["127.0.0.1", *(n.host_ip for n in nets)])
    broker = MosquittoBroker(env, port=port, extra_config=listeners + "allow_anonymous true\n")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def watcher(broker: MosquittoBroker) -> Iterator[Watcher]:
    topics = [f"{PREFIX}/devices/+/{leaf}" for leaf in ("update", "state", "telemetry")]
    with Watcher(broker, *topics) as w:
        yield w


class DeviceLog(UpdateLog):
    """One device's update topic, as the operator's subscriber received it."""

    def __init__(self, watcher: Watcher, device: str) -> None:
        super().__init__(watcher)
        self.topic = f"{PREFIX}/devices/{device}/update"

    def all(self) -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in self.watcher.on(self.topic)]

    def arrived(self, state: str, version: str) -> float:
        """When the broker delivered this device's first `state` message for `version`."""
        return next(m.at for m in self.watcher.on(self.topic)
                    if (p := json.loads(m.payload))["state"] == state and p["version"] == version)


@dataclass
class Device:
    """One `edgefleet serve` inside its namespace, and the mirror listener on its veth."""

    name: str
    net: Netns
    mirror: HostMirror
    state_dir: Path
    port: int
    log_path: Path
    keepalive_s: int = 5
    updates: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.net.dev_ip}:{self.port}"

    def config(self, env: Path, hub: HubRepository, broker: MosquittoBroker) -> Path:
        path = env / f"{self.name}.toml"
        path.write_text(f"""
state_dir = "{self.state_dir}"
[server]
host = "0.0.0.0"
port = {self.port}
[[models]]
name = "{EMBED}"
[telemetry]
interval_s = 2
[mqtt]
host = "{self.net.host_ip}"
port = {broker.port}
device_id = "{self.name}"
group = "{GROUP}"
keepalive_s = {self.keepalive_s}
reconnect_min_s = 0.2
reconnect_max_s = 1.0
[updates]
hub_url = "{self.mirror.url}"
trust_root = "{hub.dir / "trust-root.json"}"
poll_interval_s = 60
health_checks = 2
health_check_interval_s = 0.2
read_timeout_s = 3
download_retries = 2
job_timeout_s = {JOB_TIMEOUT_S}
min_free_mb = 0
{self.updates}
""")
        return path

    def start(self, config: Path) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.net.command(sys.executable, "-m", "agent", "serve", "--config",
                                                          str(config)), cwd=REPO, stdout=log, stderr=log)

    async def ready(self, session: aiohttp.ClientSession, timeout_s: float = 180) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log()[-3000:]
            try:
                async with session.get(self.url + "/readyz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.2)
        raise AssertionError(f"{self.name} not ready in {timeout_s}s: {self.log()[-3000:]}")

    async def serving(self) -> str:
        """The version it serves, asked over its own link; and it answers an embedding."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.get(f"{self.url}/v2/models/{EMBED}") as resp:
                meta = await resp.json()
            async with session.post(f"{self.url}/v1/embeddings",
                                    json={"model": EMBED, "input": [f"asked {self.name}"]}) as resp:
                assert resp.status == 200, await resp.text()
        (version,) = meta["versions"]
        return version

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
async def fleet(
    env: Path, nets: list[Netns], hub: HubRepository, broker: MosquittoBroker, watcher: Watcher
) -> AsyncIterator[dict[str, Device]]:
    devices: dict[str, Device] = {}
    try:
        for name, net in zip(DEVICES, nets, strict=True):
            mirror = HostMirror(hub.dir / "repository", host=net.host_ip)
            await mirror.start()
            device = Device(name, net, mirror, env / name, free_port(), env / f"{name}.log")
            if name == QUIET:  # MQTT's default keepalive: a short outage goes unnoticed by the link
                device.keepalive_s = 60
                device.updates = f"check_interval_s = {CHECK_INTERVAL_S}"
            devices[name] = device
            device.start(device.config(env, hub, broker))
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(d.ready(session) for d in devices.values()))
        for name in DEVICES:  # each one's birth message reached the broker over its veth
            await watcher.wait(f"{PREFIX}/devices/{name}/state", timeout_s=60)
        yield devices
    finally:
        for device in devices.values():
            device.stop()
            await device.mirror.stop()


def new_release(env: Path, hub: HubRepository, watcher: Watcher, version: str, extra_bytes: int) -> Path:
    """A release of the embedding model with a random extra file, published for the group, doorbell rung."""
    bundle = make_release(env / "v1", env / f"rel-{version}", version,  # model.onnx as it was: not fetched again
                          extra={"calibration.bin": os.urandom(extra_bytes)})
    result = publish_release(hub, EMBED, bundle)
    watcher.publish(GROUP_DOORBELL, result.doorbell, retain=True)
    return target_file(hub, EMBED, version, "calibration.bin")


def state_messages(watcher: Watcher, device: str, after: float = 0.0) -> list[dict[str, Any]]:
    """The device's state messages the broker delivered after `after` (monotonic time)."""
    return [json.loads(m.payload) for m in watcher.on(f"{PREFIX}/devices/{device}/state")
            if m.payload and m.at > after]


async def wait_until(check: Any, what: str, timeout_s: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        assert loop.time() < deadline, f"not within {timeout_s}s: {what}"
        await asyncio.sleep(0.1)


def test_unavailable_says_why() -> None:
    """The skip names the cause: not root, no iproute2."""
    assert "need root" in (netns.unavailable(euid=1000) or "")
    assert "iproute2" in (netns.unavailable(euid=0, ip=None) or "")


def test_namespaces_are_deleted_when_the_test_body_fails() -> None:
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="the test failed"), netns.namespaces(2) as made:
        names = [(n.name, n.host_if) for n in made]
        listed = netns.run(netns.IP, "netns", "list").stdout
        assert all(name in listed for name, _ in names)
        raise RuntimeError("the test failed")
    listed = netns.run(netns.IP, "netns", "list").stdout
    links = netns.run(netns.IP, "-o", "link").stdout
    for name, host_if in names:
        assert name not in listed and f" {host_if}@" not in links


async def test_link_lost_mid_download_fails_reports_then_resumes_where_it_stopped(
    fleet: dict[str, Device], env: Path, hub: HubRepository, watcher: Watcher
) -> None:
    cut, others = fleet["fleet-a"], [fleet["fleet-b"], fleet["fleet-c"]]
    logs = {name: DeviceLog(watcher, name) for name in fleet}
    seqs = {name: log.last_seq() for name, log in logs.items()}
    size = 16 * 1024 * 1024
    cut.net.shape("20mbit", netem=False)  # about 7 s for the extra file: time to pull the plug
    try:
        extra = new_release(env, hub, watcher, "2", size)
        cut.mirror.on(extra.name)  # streamed by the mirror in pieces, so it counts what it really sent
        part = ModelStore(cut.state_dir).staging_path(extra.name.split(".", 1)[0])
        await wait_until(lambda: part.exists() and part.stat().st_size >= size // 4, "a quarter downloaded", 120)
        cut.net.link(False)
        had, at, logged = part.stat().st_size, time.monotonic(), len(cut.log())
        assert had < size
        # the broker sees the device gone (its Last Will), and the device gives the job up
        await wait_until(lambda: any(not s["online"] for s in state_messages(watcher, cut.name, after=at)),
                         f"{cut.name} offline on the broker")
        await wait_until(lambda: "(hub-unreachable)" in cut.log()[logged:], f"{cut.name}'s job failed")
        assert not [m for m in logs[cut.name].since(seqs[cut.name]) if m["state"] == "failed"]  # nothing got out
        # the two others were not disturbed by it
        for device in others:
            message = await logs[device.name].until(seqs[device.name], {"active", "failed"}, EMBED, timeout_s=120)
            assert message["state"] == "active" and message["version"] == "2", message
        cut.net.link(True)
        failed = await logs[cut.name].until(seqs[cut.name], "failed", EMBED, timeout_s=60)
        assert failed["code"] == "hub-unreachable" and failed["version"] == "2", failed
        active = await logs[cut.name].until(failed["seq"], {"active", "failed"}, EMBED, timeout_s=120)
        assert active["state"] == "active" and active["version"] == "2", active
    finally:
        cut.net.link(True)
        cut.net.unshape()
    rel = next(p for p in cut.mirror.ranges if p.endswith(extra.name))
    ranges = cut.mirror.ranges[rel]
    assert ranges[0] is None and ranges[-1] is not None, ranges
    resumed_from = int(ranges[-1].removeprefix("bytes=").rstrip("-"))
    assert had <= resumed_from < size, (had, ranges)  # continued where it stopped, not from 0
    assert cut.mirror.sent[rel] < 2 * size, cut.mirror.sent[rel]
    print(f"link cut at {had} of {size} bytes; resumed with Range {ranges[-1]}; the hub sent {cut.mirror.sent[rel]}")
    for device in fleet.values():
        assert await device.serving() == "2", device.name


async def test_slow_link_updates_within_the_deadline_without_holding_the_others_back(
    fleet: dict[str, Device], env: Path, hub: HubRepository, watcher: Watcher
) -> None:
    slow, others = fleet["fleet-b"], [fleet["fleet-a"], fleet["fleet-c"]]
    logs = {name: DeviceLog(watcher, name) for name in fleet}
    seqs = {name: log.last_seq() for name, log in logs.items()}
    qdisc = slow.net.shape("2mbit", delay_ms=200, netem=netns.netem_available())
    print(f"slow link: tc qdisc {qdisc}")
    telemetry = f"{PREFIX}/devices/{slow.name}/telemetry"
    try:
        new_release(env, hub, watcher, "3", 3 * 1024 * 1024)  # about 12 s at 2 Mbit/s
        finished = {}
        for device in others:
            message = await logs[device.name].until(seqs[device.name], {"active", "failed"}, EMBED, timeout_s=120)
            assert message["state"] == "active" and message["version"] == "3", message
            finished[device.name] = logs[device.name].arrived("active", "3")
        message = await logs[slow.name].until(seqs[slow.name], {"active", "failed", "rolled-back"}, EMBED,
                                              timeout_s=JOB_TIMEOUT_S + 30)
        assert message["state"] == "active" and message["version"] == "3", message  # not failed "timeout"
        started, done = logs[slow.name].arrived("downloading", "3"), logs[slow.name].arrived("active", "3")
        assert all(at < done for at in finished.values()), (finished, done)
        # while it downloaded, its telemetry still came through the slow link
        assert [m for m in watcher.on(telemetry) if started < m.at < done], "no telemetry during the download"
        await wait_until(lambda: any(s.get("models", {}).get(EMBED, {}).get("version") == "3"
                                     for s in state_messages(watcher, slow.name)), f"{slow.name}'s state names 3")
        assert await slow.serving() == "3"
    finally:
        slow.net.unshape()
    for device in others:
        assert await device.serving() == "3", device.name


async def test_an_outage_mqtt_does_not_notice_still_ends_with_the_update_done(
    fleet: dict[str, Device], env: Path, hub: HubRepository, watcher: Watcher
) -> None:
    """The link is down long enough for the download to give up, not long enough for MQTT's
    keepalive (60 s) to notice: no reconnect, so no reconnect trigger. The device must still
    finish the update on its own, without another doorbell: its timer check
    (``updates.check_interval_s``) starts the job again."""
    quiet = fleet[QUIET]
    log = DeviceLog(watcher, quiet.name)
    seq = log.last_seq()
    size = 16 * 1024 * 1024
    quiet.net.shape("20mbit", netem=False)
    try:
        extra = new_release(env, hub, watcher, "4", size)
        quiet.mirror.on(extra.name)
        part = ModelStore(quiet.state_dir).staging_path(extra.name.split(".", 1)[0])
        await wait_until(lambda: part.exists() and part.stat().st_size >= size // 4, "a quarter downloaded", 120)
        quiet.net.link(False)
        at, logged = time.monotonic(), len(quiet.log())
        await wait_until(lambda: "(hub-unreachable)" in quiet.log()[logged:], f"{quiet.name}'s job failed")
        quiet.net.link(True)
        failed = await log.until(seq, "failed", EMBED, timeout_s=60)
        assert failed["code"] == "hub-unreachable", failed
        message = await log.until(failed["seq"], {"active", "failed"}, EMBED, timeout_s=60)
        assert message["state"] == "active" and message["version"] == "4", message
        assert all(s["online"] for s in state_messages(watcher, quiet.name, after=at))  # MQTT never dropped
    finally:
        quiet.net.link(True)
        quiet.net.unshape()
    assert await quiet.serving() == "4"
