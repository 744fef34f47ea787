"""`edgefleet hub webhooks` against a real mosquitto and a local receiver that checks signatures.

The receiver (aiohttp, in the test's loop) does what an operator's endpoint does: it verifies
``X-Edgefleet-Signature-256`` over the timestamp and the raw body with its own hmac code,
refuses stale timestamps, deduplicates on ``X-Edgefleet-Delivery`` and counts duplicates.
Events are real MQTT messages in the fleet's schemas, published retained where devices
retain them; one comes from a real agent killed with SIGKILL (its Last Will).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import EMBED, free_port
from mqtt_broker import MosquittoBroker, Watcher
from service_process import ServiceProcess
from update_env import GROUP, create_hub, make_release

from sync.hub.rollouts.record import Plan, RolloutRecord
from sync.hub.rollouts.topic import rollout_body, rollout_message

REPO = Path(__file__).resolve().parent.parent
PREFIX = "edgefleet/v1"
STATUS = f"{PREFIX}/hub/webhooks"
KEY = b"3f1c9a0d5e7b2a4c6d8e0f1a2b3c4d5e"
OTHER_KEY = b"0b8e6c4a2d0f9e7c5a3b1d9f7e5c3a1b"


# ---- the receiver ------------------------------------------------------------------------------

def verify(secret: bytes, headers: Any, body: bytes, tolerance_s: float = 300) -> bool:
    """A receiver's check, written from the documented format (not the hub's code)."""
    try:
        timestamp = int(headers["X-Edgefleet-Timestamp"])
        given = headers["X-Edgefleet-Signature-256"]
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    expected = "sha256=" + hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, given)


@dataclass
class Request:
    at: float
    headers: dict[str, str]
    body: bytes
    status: int


@dataclass
class Receiver:
    """An endpoint that answers `answer(body) -> (status, headers)`, 200 by default."""

    secret: bytes
    port: int = field(default_factory=free_port)
    answer: Callable[[dict[str, Any]], tuple[int, dict[str, str]]] = lambda body: (200, {})
    requests: list[Request] = field(default_factory=list)
    #: delivery id -> body, first one taken (what a deduplicating receiver keeps), in arrival order
    delivered: dict[str, dict[str, Any]] = field(default_factory=dict)
    duplicates: int = 0
    bad_signatures: int = 0
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/edgefleet"

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if not verify(self.secret, request.headers, raw):
            self.bad_signatures += 1
            self.requests.append(Request(time.monotonic(), dict(request.headers), raw, 401))
            return web.json_response({"error": "bad signature"}, status=401)
        body = json.loads(raw)
        status, headers = self.answer(body)
        self.requests.append(Request(time.monotonic(), dict(request.headers), raw, status))
        if 200 <= status < 300:
            delivery = request.headers["X-Edgefleet-Delivery"]
            if delivery in self.delivered:
                self.duplicates += 1
            else:
                self.delivered[delivery] = body
        return web.Response(status=status, headers=headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks/edgefleet", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [b for b in self.delivered.values() if kind is None or b["event"] == kind]

    async def wait(self, predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout_s}s; delivered "
                                     f"{[(b['event'], b.get('device') or b.get('rollout')) for b in self.events()]}")
            await asyncio.sleep(0.05)



@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    running = Receiver(KEY)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


# ---- the hub side -------------------------------------------------------------------------------

def write_key(path: Path, key: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(key + b"\n")
    path.chmod(mode)
    return path


def write_hub(hub: Path, *entries: str) -> Path:
    hub.mkdir(exist_ok=True)
    (hub / "webhooks.toml").write_text("\n".join(entries))
    return hub


def entry(url: str, key_file: str, **extra: Any) -> str:
    lines = ["[[webhook]]", f'url = "{url}"', f'secret_file = "{key_file}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False, env={**os.environ, "EDGEFLEET_CONFIG": ""})


class HubWebhooks:
    """The real `edgefleet hub webhooks` process."""

    def __init__(self, hub: Path, broker: MosquittoBroker) -> None:
        self.hub, self.broker = hub, broker
        self.log_path = hub / "webhooks.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "agent", "hub", "webhooks", "--hub", str(self.hub),
                                          "--mqtt", f"127.0.0.1:{self.broker.port}"], cwd=REPO, stdout=log,
                                         stderr=subprocess.STDOUT, env={**os.environ, "EDGEFLEET_CONFIG": ""})

    def stop(self) -> int:
        """SIGTERM, as systemd stops it: a clean exit."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        finally:
            self.proc.kill()
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: no goodbye, nothing flushed but what was committed."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def hub_process(tmp_path: Path, mqtt_broker: MosquittoBroker) -> Iterator[Callable[..., HubWebhooks]]:
    started: list[HubWebhooks] = []

    def start(hub: Path) -> HubWebhooks:
        process = HubWebhooks(hub, mqtt_broker)
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc is not None:
            process.proc.kill()
            process.proc.wait()


async def status(watcher: Watcher, predicate: Callable[[dict[str, Any]], bool], what: str,
                 timeout_s: float = 30.0) -> dict[str, Any]:
    """The hub's retained status message, once one satisfies `predicate`."""
    deadline = time.monotonic() + timeout_s
    while True:
        messages = [json.loads(m.payload) for m in watcher.on(STATUS) if m.payload]
        if messages and predicate(messages[-1]):
            return messages[-1]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s; last status {messages[-1:]}")
        await asyncio.sleep(0.05)


def online(watcher: Watcher) -> Any:
    return status(watcher, lambda s: s.get("online") is True and s.get("connected") is True, "webhooks connected")


# ---- messages in the fleet's schemas ------------------------------------------------------------

def state(device: str, up: bool, group: str = "lab") -> bytes:
    body: dict[str, Any] = {"schema": "edgefleet.state/1", "device_id": device, "group": group, "online": up}
    body |= {"at": time.time(), "agent_version": "0.1.0", "models": {}} if up else {"reason": "connection lost"}
    return json.dumps(body).encode()


def update(device: str, seq: int, job_state: str, version: str = "2", code: str | None = None) -> bytes:
    return json.dumps({
        "schema": "edgefleet.update/1", "device": device, "group": "lab", "seq": seq, "job": f"job-{device}-{version}",
        "model": EMBED, "version": version, "from_version": "1", "state": job_state, "code": code, "message": None,
        "serial": "7.0", "targets_version": 12, "serving": {EMBED: "1"}, "at": time.time()}).encode()


def alert(device: str, rule: str, alert_state: str, since: float) -> bytes:
    return json.dumps({
        "schema": "edgefleet.alert/1", "rule": rule, "state": alert_state, "severity": "warning", "value": 93.25,
        "threshold": 90.0, "resolve": 85.0, "unit": "%", "since": since, "at": time.time(),
        "message": "The state directory's filesystem is 93.25% full, above the limit of 90% full.",
        "device": device, "group": "lab"}).encode()


def rollout(record: RolloutRecord) -> bytes:
    """The rollout topic's body, made by the code the controller and the CLI publish it with."""
    return rollout_message(rollout_body(record))


def a_rollout() -> RolloutRecord:
    now = time.time()
    return RolloutRecord(id="r-3f9a2c", group="lab", model=EMBED, from_version="1", to_version="2",
                         to_files={"model.onnx": "sha256"}, plan=Plan([50.0, 100.0], 1.0, 0.1, 1, 60.0),
                         salt="3f9a2c1b77e0d4aa", serial=5, created_at=now, step_started_at=now,
                         history=[{"at": now, "event": "step", "step": 1, "percent": 50.0, "serial": 5}])


# ---- the tests ----------------------------------------------------------------------------------

def test_a_configuration_that_cannot_work_is_one_line_and_exit_2(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    hub.mkdir()
    missing = cli("hub", "webhooks", "--hub", str(hub), "--check")
    assert missing.returncode == 2 and "webhooks.toml: no such file" in missing.stderr, missing
    write_key(hub / "ops.key", KEY, 0o644)
    cases = {
        entry("http://127.0.0.1:9/x", "ops.key"): "is readable by others (mode 0644); the key must be private: "
                                                   f"chmod 600 {hub / 'ops.key'}",
        entry("ftp://example.com/x", "ops.key"): "webhook[0]: url: 'ftp://example.com/x' is not an http:// or "
                                                 "https:// URL",
        entry("http://127.0.0.1:9/x", "ops.key", events=["device.offline", "device.exploded"]):
            "webhook[0]: events: unknown event kind 'device.exploded'",
        entry("http://127.0.0.1:9/x", "ops.key", timeout="10s"): "unknown key webhook[0].timeout",
        entry("http://127.0.0.1:9/x", "nowhere.key"): f"webhook[0].secret_file: cannot read {hub / 'nowhere.key'}",
        "[[webhook]\n": "not valid TOML",
    }
    for text, message in cases.items():
        write_hub(hub, text)
        done = cli("hub", "webhooks", "--hub", str(hub), "--mqtt", "127.0.0.1:9")
        assert done.returncode == 2, (text, done)
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, (text, done.stderr)
        assert "Traceback" not in done.stderr
    (hub / "ops.key").chmod(0o600)
    write_hub(hub, entry("https://ops.example.com/edgefleet", "ops.key", name="ops", events=["alert.*"]))
    checked = cli("hub", "webhooks", "--hub", str(hub), "--check")
    assert checked.returncode == 0, checked
    assert checked.stdout.strip() == "ops: https://ops.example.com/edgefleet events alert.* (timeout 10s, " \
                                     "queue 10000)"


async def test_fleet_events_are_posted_signed_once_each_with_their_source_message(
        tmp_path: Path, mqtt_broker: MosquittoBroker, receiver: Receiver, hub_process: Any) -> None:
    """Presence, update transitions, alerts and rollout steps, each posted once, signed; the
    retained messages read again after a restart post nothing; a 4xx is given up, not retried;
    junk is counted; a second endpoint gets only the kinds it asked for."""
    alerts_only = Receiver(OTHER_KEY)
    await alerts_only.start()
    hub = write_hub(tmp_path / "hub",
                    entry(receiver.url, str(write_key(tmp_path / "main.key", KEY)), name="main",
                          retry_min_s=0.05, retry_max_s=0.5),
                    entry(alerts_only.url, "alerts.key", name="alerts", events=["alert.*"]))
    write_key(hub / "alerts.key", OTHER_KEY)
    receiver.answer = lambda body: (400, {}) if body.get("device") == "refused-1" else (200, {})
    try:
        with Watcher(mqtt_broker, STATUS) as watcher:
            process = hub_process(hub)
            await online(watcher)
            since = time.time()
            record = a_rollout()
            sent = [
                (f"{PREFIX}/devices/press-1/state", state("press-1", True), True),
                (f"{PREFIX}/devices/press-1/update", update("press-1", 41, "downloading"), True),
                (f"{PREFIX}/devices/refused-1/update", update("refused-1", 3, "failed", code="hash-mismatch"), True),
                (f"{PREFIX}/devices/press-1/update", update("press-1", 42, "active"), True),
                (f"{PREFIX}/devices/press-1/alerts/disk", alert("press-1", "disk", "firing", since), True),
                (f"{PREFIX}/devices/press-1/alerts/disk", alert("press-1", "disk", "resolved", since), False),
                (f"{PREFIX}/devices/press-1/alerts/disk", b"", True),  # the retained firing one cleared
                (f"{PREFIX}/rollouts/{record.id}", rollout(record), True),
                (f"{PREFIX}/devices/press-1/update", b"{broken", False),
                (f"{PREFIX}/devices/press-1/update", b'{"schema": "acme.update/9"}', False),
                (f"{PREFIX}/devices/press-1/state", state("press-2", False), False),  # names another device
            ]
            record.step = 1
            record.history.append({"at": time.time(), "event": "step", "step": 2, "percent": 100.0, "serial": 5})
            sent.append((f"{PREFIX}/rollouts/{record.id}", rollout(record), True))
            record.state, record.reason = "completed", None
            record.history.append({"at": time.time(), "event": "completed", "reason": None})
            sent.append((f"{PREFIX}/rollouts/{record.id}", rollout(record), True))
            sent.append((f"{PREFIX}/devices/press-1/state", state("press-1", False), True))
            for topic, payload, retain in sent:
                watcher.publish(topic, payload, retain=retain)
            want = ["device.online", "update", "update", "alert.firing", "alert.resolved", "rollout.step",
                    "rollout.step", "rollout.completed", "device.offline"]
            await receiver.wait(lambda: len(receiver.delivered) >= len(want), "every event")
            await alerts_only.wait(lambda: len(alerts_only.delivered) >= 2, "the alerts")
            posted = await status(watcher, lambda s: s["endpoints"]["main"]["given_up"] == 1
                                  and sum(s["ignored"].values()) >= 3, "the 400 given up, the junk counted")
            assert process.stop() == 0, process.log()

            # a restart reads every retained message again: nothing is posted twice
            process = hub_process(hub)
            await status(watcher, lambda s: s["online"] and s["connected"] and not s["events"], "restarted")
            watcher.publish(f"{PREFIX}/devices/press-1/state", state("press-1", True), retain=True)
            await receiver.wait(lambda: len(receiver.events("device.online")) == 2, "online again")
            assert process.stop() == 0, process.log()
    finally:
        await alerts_only.stop()

    bodies = receiver.events()
    assert [b["event"] for b in bodies] == [*want, "device.online"]
    assert receiver.duplicates == 0 and receiver.bad_signatures == 0
    refused = [r for r in receiver.requests if json.loads(r.body).get("device") == "refused-1"]
    assert [r.status for r in refused] == [400], "a 4xx is given up after one attempt"
    assert posted["endpoints"]["main"] | {"failing_since": None} == posted["endpoints"]["main"] | {
        "queued": 0, "given_up": 1, "dropped": 0, "failing_since": None}
    assert {"malformed", "not-ours", "other-owner"} <= set(posted["ignored"]), posted["ignored"]

    by_kind = {b["event"]: b for b in bodies}
    first_online, offline = bodies[0], by_kind["device.offline"]
    assert first_online == {"schema": "edgefleet.webhook/1", "id": first_online["id"], "event": "device.online",
                            "at": first_online["at"], "device": "press-1", "group": "lab",
                            "topic": f"{PREFIX}/devices/press-1/state", "data": json.loads(sent[0][1])}
    assert offline["reason"] == "connection lost" and offline["data"]["online"] is False
    updates = receiver.events("update")
    assert [(u["device"], u["state"], u["data"]["seq"]) for u in updates] == [("press-1", "downloading", 41),
                                                                              ("press-1", "active", 42)]
    firing, resolved = by_kind["alert.firing"], by_kind["alert.resolved"]
    assert (firing["rule"], firing["severity"], firing["data"]["since"]) == ("disk", "warning", since)
    assert resolved["data"]["state"] == "resolved" and resolved["data"]["since"] == since
    steps = receiver.events("rollout.step")
    assert [(s["rollout"], s["step"], s["percent"]) for s in steps] == [("r-3f9a2c", 1, 50.0), ("r-3f9a2c", 2, 100.0)]
    assert by_kind["rollout.completed"]["data"]["state"] == "completed"
    assert by_kind["rollout.completed"]["to_version"] == "2"
    assert [b["event"] for b in alerts_only.events()] == ["alert.firing", "alert.resolved"]
    assert alerts_only.bad_signatures == 0

    # the headers: the event kind, the delivery id (= the body's id), a signature over timestamp + body
    request = next(r for r in receiver.requests if r.status == 200)
    body = json.loads(request.body)
    assert request.headers["X-Edgefleet-Event"] == body["event"]
    assert request.headers["X-Edgefleet-Delivery"] == body["id"]
    assert request.headers["X-Edgefleet-Signature-256"].startswith("sha256=")
    assert verify(KEY, request.headers, request.body)
    tampered = request.body.replace(b'"press-1"', b'"press-9"')
    assert tampered != request.body and not verify(KEY, request.headers, tampered)
    assert not verify(OTHER_KEY, request.headers, request.body)
    assert not verify(KEY, request.headers, request.body, tolerance_s=-1), "a stale timestamp is refused"
    moved = dict(request.headers, **{"X-Edgefleet-Timestamp": str(int(request.headers["X-Edgefleet-Timestamp"]) + 1)})
    assert not verify(KEY, moved, request.body), "the timestamp is signed too"


async def test_a_sigkilled_agent_is_posted_offline_through_its_last_will(
        tmp_path: Path, state_dir: Path, mqtt_broker: MosquittoBroker, receiver: Receiver, hub_process: Any) -> None:
    """A real agent (the ONNX model only): its birth is posted `device.online`; killed with
    SIGKILL, the broker publishes its Last Will, posted `device.offline` (connection lost)."""
    hub = write_hub(tmp_path / "hub", entry(receiver.url, "main.key", events=["device.*"]))
    write_key(hub / "main.key", KEY)
    with Watcher(mqtt_broker, STATUS) as watcher:
        hub_process(hub)
        await online(watcher)
    work = tmp_path / "state"
    work.mkdir()
    (work / "models").symlink_to(state_dir / "models")
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{work}"\n[server]\nhost = "127.0.0.1"\nport = {free_port()}\n'
                      f'[[models]]\nname = "{EMBED}"\n[mqtt]\nhost = "127.0.0.1"\n'
                      f'port = {mqtt_broker.port}\ndevice_id = "victim"\ngroup = "lab"\nkeepalive_s = 5\n')
    agent = ServiceProcess(config, tmp_path)
    try:
        await receiver.wait(lambda: receiver.events("device.online") != [], "the birth", 90)
        agent.signal(signal.SIGKILL)
        await agent.wait_exit(10)
        await receiver.wait(lambda: receiver.events("device.offline") != [], "the Last Will", 30)
    finally:
        agent.stop()
    online_event, offline_event = receiver.events()
    assert (online_event["device"], online_event["group"]) == ("victim", "lab")
    assert offline_event["device"] == "victim" and offline_event["reason"] == "connection lost"
    assert offline_event["data"] == {"schema": "edgefleet.state/1", "device_id": "victim", "group": "lab",
                                     "online": False, "reason": "connection lost"}
    assert receiver.bad_signatures == 0 and receiver.duplicates == 0


async def test_a_receiver_outage_and_a_hub_restart_deliver_every_event_once_in_order(
        tmp_path: Path, mqtt_broker: MosquittoBroker, receiver: Receiver, hub_process: Any) -> None:
    """The receiver answers 503 (Retry-After once), then is down, while events keep coming; the
    hub process is killed (SIGKILL) and started again mid-outage, and events arrive while it is down;
    the receiver comes back: every event delivered, once after deduplication, in order. A
    second endpoint that accepts connections and never answers delays none of it; its
    bounded queue drops its oldest events and says so."""
    stuck = socket.socket()
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(64)  # connections are taken by the kernel; nothing ever answers
    hub = write_hub(tmp_path / "hub",
                    entry(receiver.url, "main.key", name="main", retry_min_s=0.05, retry_max_s=0.5),
                    entry(f"http://127.0.0.1:{stuck.getsockname()[1]}/hook", "main.key", name="stuck",
                          timeout_s=30.0, max_queue=5))
    write_key(hub / "main.key", KEY)
    topic = f"{PREFIX}/devices/outage-1/update"
    seq = iter(range(1, 1000))
    states = ["queued", "downloading", "verifying", "staged", "activating"]

    def publish(watcher: Watcher, count: int) -> None:
        for _ in range(count):
            n = next(seq)
            watcher.publish(topic, update("outage-1", n, states[n % len(states)]), retain=True)

    try:
        with Watcher(mqtt_broker, STATUS) as watcher:
            process = hub_process(hub)
            await online(watcher)
            publish(watcher, 5)
            # the stuck endpoint holds its first attempt for 30 s: the receiver's events do not wait for it
            await receiver.wait(lambda: len(receiver.delivered) == 5, "delivered beside a stuck endpoint", 15)

            answers = iter([(503, {"Retry-After": "2"})])
            receiver.answer = lambda body: next(answers, (503, {}))
            publish(watcher, 5)
            await receiver.wait(lambda: sum(r.status == 503 for r in receiver.requests) >= 3, "503s")
            await receiver.stop()
            publish(watcher, 5)
            await status(watcher, lambda s: s["endpoints"]["main"]["queued"] == 10
                         and "Connect" in (s["endpoints"]["main"]["last_error"] or ""), "connection refused")
            process.kill()  # mid-outage, without a goodbye: what was queued is on disk
            publish(watcher, 5)  # the hub is down: the broker keeps them in the hub's session
            process = hub_process(hub)
            publish(watcher, 5)
            await status(watcher, lambda s: s["online"] and s["endpoints"]["main"]["queued"] == 20, "all queued")

            receiver.answer = lambda body: (200, {})
            await receiver.start()
            await receiver.wait(lambda: len(receiver.delivered) == 25, "every event after the outage", 60)
            final = await status(watcher, lambda s: s["endpoints"]["main"]["queued"] == 0, "the queue drained")
            assert process.stop() == 0, process.log()
    finally:
        stuck.close()

    assert [b["data"]["seq"] for b in receiver.events()] == list(range(1, 26)), "each once, in order"
    assert [b["event"] for b in receiver.events()] == ["update"] * 25
    assert receiver.bad_signatures == 0
    # Retry-After: 2 was honoured: the next attempt came no sooner (retry_min_s is 0.05)
    first_503 = next(i for i, r in enumerate(receiver.requests) if r.status == 503)
    assert receiver.requests[first_503 + 1].at - receiver.requests[first_503].at >= 2.0
    main, stuck_endpoint = final["endpoints"]["main"], final["endpoints"]["stuck"]
    assert main["delivered"] == 25 + receiver.duplicates and main["given_up"] == main["dropped"] == 0
    assert main["retries"] >= 3 and main["failing_since"] is None
    assert stuck_endpoint["delivered"] == 0 and stuck_endpoint["queued"] == 5 and stuck_endpoint["dropped"] == 20
    print(f"duplicates on the wire: {receiver.duplicates}")


async def test_the_rollout_commands_are_posted_step_pause_resume_abort(
        tmp_path: Path, state_dir: Path, mqtt_broker: MosquittoBroker, receiver: Receiver, hub_process: Any) -> None:
    """`hub rollout start | pause | resume | abort` (the real CLI, which publishes the rollout's
    status on its topic at once): each one posted, the abort with its reason."""
    hub = tmp_path / "hub"
    create_hub(hub, state_dir, (EMBED,))
    write_hub(hub, entry(receiver.url, "main.key", events=["rollout.*"]))
    write_key(hub / "main.key", KEY)
    with Watcher(mqtt_broker, STATUS) as watcher:
        process = hub_process(hub)
        await online(watcher)
    bundle = make_release(state_dir / "models" / EMBED / "current", tmp_path / "release-2", "2", onnx_note="r2")
    mqtt = ["--mqtt", f"127.0.0.1:{mqtt_broker.port}"]
    started = await asyncio.to_thread(cli, "hub", "rollout", "start", "--hub", str(hub), "--group", GROUP,
                                      f"{EMBED}={bundle}", "--steps", "50,100", "--wait", "1h", "--min-devices",
                                      "1", *mqtt)
    assert started.returncode == 0, started
    rollout_id = started.stdout.split("rollout ", 1)[1].split()[0]
    for action in ("pause", "resume", "abort"):
        done = await asyncio.to_thread(cli, "hub", "rollout", action, "--hub", str(hub), rollout_id, *mqtt)
        assert done.returncode == 0, done
    await receiver.wait(lambda: len(receiver.delivered) >= 4, "the rollout's events")
    assert process.stop() == 0, process.log()
    events = receiver.events()
    assert [e["event"] for e in events] == ["rollout.step", "rollout.paused", "rollout.resumed", "rollout.aborted"]
    assert all(e["rollout"] == rollout_id and e["group"] == GROUP and e["model"] == EMBED for e in events)
    assert (events[0]["step"], events[0]["percent"], events[0]["to_version"]) == (1, 50.0, "2")
    assert events[-1]["reason"] == "aborted by the operator" and events[-1]["data"]["state"] == "aborted"


def test_which_answers_are_retried_and_how_long_the_waits_are() -> None:
    """The status classes, Retry-After in both forms (capped), and the backoff's bounds."""
    import email.utils
    import random

    from sync.hub.webhooks.delivery import RETRY_AFTER_MAX_S, backoff, classify, parse_retry_after

    now = 1767225600.0
    assert [classify(s, None, now).outcome for s in (200, 202, 204)] == ["delivered"] * 3
    assert [classify(s, None, now).outcome for s in (408, 429, 500, 502, 503, 504)] == ["retry"] * 6
    assert [classify(s, None, now).outcome for s in (301, 400, 401, 403, 404, 410, 413)] == ["given_up"] * 7
    assert classify(503, "7", now).retry_after == 7.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after("999999", now) == RETRY_AFTER_MAX_S
    assert parse_retry_after("soon", now) is None and parse_retry_after(None, now) is None
    rng = random.Random(7)
    for failures, ceiling in ((1, 1.0), (2, 2.0), (5, 16.0), (9, 256.0), (10, 300.0), (500, 300.0)):
        waits = [backoff(failures, 1.0, 300.0, rng) for _ in range(50)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits), (failures, min(waits), max(waits))
