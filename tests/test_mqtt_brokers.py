"""The agent and the hub's tools on an MQTT 3.1.1 broker: RabbitMQ's MQTT plugin.

Debian's RabbitMQ (3.10) speaks MQTT 3.1.1 only: it closes the connection at an
MQTT 5 CONNECT. A real agent process with the default ``[mqtt] protocol = "auto"``
must fall back to 3.1.1 and still give the operator everything: its retained
birth and Last Will on the state topic, its update reports, a signed update rung
in by `edgefleet hub publish` and shown by `hub status`, and a reply to
``check-now`` through the JSON fallback for MQTT 5's response topic and
correlation data (docs/mqtt.md, "MQTT 3.1.1 brokers").
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EMBED, free_port
from mqtt_broker import MosquittoBroker, Watcher
from paho.mqtt.enums import MQTTProtocolVersion
from rabbitmq_broker import RabbitMqBroker, rabbitmq_installed, running_rabbitmq
from update_env import CMD_TOPIC, DEVICE, GROUP, UPDATE_TOPIC, create_hub, embedding_state, make_release

from sync.errors import HubUnreachable
from sync.hub.mqtt_tools import Broker, negotiate_protocol, ring_doorbell
from sync.mqtt import InboundMessage, MqttLink, MqttSettings
from sync.mqtt.protocol import UNSUPPORTED_PROTOCOL_VERSION, ProtocolChoice

REPO = Path(__file__).resolve().parent.parent
EDGEFLEET = [sys.executable, "-m", "agent"]
STATE_TOPIC = f"edgefleet/v1/devices/{DEVICE}/state"
V311 = MQTTProtocolVersion.MQTTv311



@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = embedding_state(tmp_path_factory.mktemp("rabbitmq"))
    create_hub(root / "hub", root / "state", (EMBED,))
    return root


@pytest.fixture(scope="module")
def rabbit(env: Path) -> Iterator[RabbitMqBroker]:
    if not rabbitmq_installed():
        pytest.skip("rabbitmq-server is not installed (scripts/setup.sh --test installs it): "
                    "the MQTT 3.1.1 broker tests run against its MQTT plugin")
    with running_rabbitmq(env) as broker:
        yield broker


@pytest.fixture(scope="module")
def hub_url(env: Path) -> Iterator[str]:
    """`edgefleet hub serve`, as the operator runs it."""
    port = free_port()
    with (env / "hub-serve.log").open("wb") as log:
        proc = subprocess.Popen([*EDGEFLEET, "hub", "serve", "--hub", str(env / "hub"), "--port", str(port)],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/metadata/1.root.json", proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, f"exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{url} did not answer within {timeout_s:g}s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def agent(env: Path, rabbit: RabbitMqBroker, hub_url: str) -> Iterator[subprocess.Popen[bytes]]:
    """`edgefleet serve` with only the embedding model, on RabbitMQ, with the default protocol ("auto")."""
    port = free_port()
    config = env / "agent.toml"
    config.write_text(f"""
state_dir = "{env / 'state'}"
[server]
port = {port}
[[models]]
name = "{EMBED}"
[mqtt]
host = "{rabbit.host}"
port = {rabbit.port}
device_id = "{DEVICE}"
group = "{GROUP}"
reconnect_min_s = 0.2
reconnect_max_s = 1.0
[updates]
hub_url = "{hub_url}"
trust_root = "{env / 'hub/trust-root.json'}"
health_checks = 2
health_check_interval_s = 0.1
min_free_mb = 0
[telemetry]
enabled = false
""")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    with (env / "agent.log").open("wb") as log:
        proc = subprocess.Popen([*EDGEFLEET, "serve", "--config", str(config)], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, env=environ)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def watcher(rabbit: RabbitMqBroker) -> Iterator[Watcher]:
    with Watcher(rabbit, UPDATE_TOPIC, STATE_TOPIC, "test/replies/#", protocol=V311) as w:
        yield w


def agent_log(env: Path) -> str:
    return (env / "agent.log").read_text(errors="replace")


def cli(*args: str, timeout_s: float = 120.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGEFLEET, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
                          check=False, env=env)


def states(watcher: Watcher) -> list[dict[str, object]]:
    return [json.loads(m.payload) for m in watcher.on(UPDATE_TOPIC)]


def test_the_agent_falls_back_to_3_1_1_and_its_birth_is_retained(
        env: Path, rabbit: RabbitMqBroker, agent: subprocess.Popen[bytes]) -> None:
    with Watcher(rabbit, STATE_TOPIC, protocol=V311) as late:  # subscribes after the birth: the retained copy
        birth = json.loads(late.wait_for(STATE_TOPIC, timeout_s=60)[-1].payload)
    assert birth["online"] is True and birth["device_id"] == DEVICE and birth["group"] == GROUP, birth
    log = agent_log(env)
    assert "mqtt: using MQTT 3.1.1" in log, log[-3000:]
    assert log.count("mqtt: using MQTT") == 1, log[-3000:]  # said once


def test_hub_publish_rings_the_doorbell_and_the_agent_installs_the_signed_update(
        env: Path, rabbit: RabbitMqBroker, agent: subprocess.Popen[bytes], watcher: Watcher) -> None:
    release = make_release(env / "state/models" / EMBED / "current", env / "emb-2", "2",
                           onnx_note="edgefleet release 2 on rabbitmq")
    broker = f"{rabbit.host}:{rabbit.port}"
    follower = Follower(broker, watcher)  # `hub status --follow`, subscribed before the release exists
    done = cli("hub", "publish", "--hub", str(env / "hub"), "--group", GROUP, f"{EMBED}={release}",
               "--mqtt", broker)
    assert done.returncode == 0 and "doorbell rung on edgefleet/v1/groups/lab/desired" in done.stdout, (
        done.stdout + done.stderr)
    deadline = time.monotonic() + 120
    while not any(s.get("state") == "active" and s.get("version") == "2" for s in states(watcher)):
        assert time.monotonic() < deadline, f"no active 2 on the update topic: {states(watcher)}"
        time.sleep(0.2)
    seen = [s["state"] for s in states(watcher) if s.get("version") == "2"]
    assert seen[-1] == "active" and "downloading" in seen and "verifying" in seen, seen
    assert follower.proc.wait(60) == 0, follower.lines
    assert f"{DEVICE}: {EMBED} 2 -> active" in follower.lines[-1], follower.lines


class Follower:
    """`edgefleet hub status --follow --until active`, once it is known to be subscribed: a
    message on another device's update topic is sent until it prints it."""

    def __init__(self, broker: str, watcher: Watcher) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen([*EDGEFLEET, "hub", "status", "--mqtt", broker, "--follow", "120",
                                      "--until", "active"], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        probe = "edgefleet/v1/devices/follow-probe/update"
        deadline = time.monotonic() + 60
        while not any(line.startswith("follow-probe:") and line.endswith("-> probe") for line in self.lines):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.lines
            watcher.publish(probe, json.dumps({"device": "follow-probe", "state": "probe"}))
            time.sleep(0.5)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())


def test_check_now_is_answered_on_the_response_topic_named_in_the_command(
        agent: subprocess.Popen[bytes], watcher: Watcher) -> None:
    command = {"command": "check-now", "response_topic": "test/replies/rabbit", "correlation": "c-311"}
    watcher.publish(CMD_TOPIC, json.dumps(command))
    (reply,) = watcher.wait_for("test/replies/rabbit", timeout_s=60)
    body = json.loads(reply.payload)
    assert body["ok"] is True and body["command"] == "check-now", body
    assert body["correlation"] == "c-311", body


def test_the_last_will_marks_a_killed_agent_offline(
        rabbit: RabbitMqBroker, agent: subprocess.Popen[bytes], watcher: Watcher) -> None:
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait()
    deadline = time.monotonic() + 60
    while True:
        last = json.loads(watcher.on(STATE_TOPIC)[-1].payload)
        if last["online"] is False:
            break
        assert time.monotonic() < deadline, f"no Last Will on {STATE_TOPIC}: {last}"
        time.sleep(0.2)
    assert last["reason"] == "connection lost", last
    with Watcher(rabbit, STATE_TOPIC, protocol=V311) as late:  # and it is retained
        assert json.loads(late.wait_for(STATE_TOPIC)[-1].payload)["online"] is False


async def test_a_message_published_before_the_fallback_is_delivered_after_it(rabbit: RabbitMqBroker) -> None:
    """Handed to the MQTT 5 client while it still tries, acknowledged through the 3.1.1 one."""
    settings = MqttSettings(host=rabbit.host, port=rabbit.port, device_id="early-bird", group=GROUP,
                            reconnect_min_s=0.2, reconnect_max_s=1.0)
    topic = "edgefleet/v1/devices/early-bird/update"
    with Watcher(rabbit, topic, protocol=V311) as watcher:
        link = MqttLink(settings)
        await link.start()
        try:
            await asyncio.wait_for(link.publish(topic, {"state": "queued"}), 30)
            assert link.status.protocol == "3.1.1" and link.connected
            (got,) = await watcher.wait(topic)
            assert json.loads(got.payload) == {"state": "queued"}
        finally:
            await link.stop()


async def test_protocol_3_1_1_connects_at_once(rabbit: RabbitMqBroker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sync.mqtt.link")
    settings = MqttSettings(host=rabbit.host, port=rabbit.port, device_id="fixed-311", protocol="3.1.1")
    async with MqttLink(settings) as link:
        await link.wait_connected(30)
        assert link.status.protocol == "3.1.1"
    assert "mqtt: using MQTT 3.1.1" in caplog.text and "refused" not in caplog.text, caplog.text


def test_hub_tools_told_to_speak_mqtt_5_say_why_they_cannot(rabbit: RabbitMqBroker) -> None:
    with pytest.raises(HubUnreachable, match="closed the connection at the CONNECT"):
        ring_doorbell(Broker(rabbit.host, rabbit.port, protocol="5"), "edgefleet/v1/groups/x/desired", b"{}")
    assert negotiate_protocol(Broker(rabbit.host, rabbit.port)) == V311


def test_hub_tools_keep_mqtt_5_where_the_broker_has_it(mqtt_broker: MosquittoBroker) -> None:
    assert negotiate_protocol(Broker(mqtt_broker.host, mqtt_broker.port)) == MQTTProtocolVersion.MQTTv5


def test_a_bad_protocol_setting_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[mqtt]\nhost = "127.0.0.1"\nprotocol = "3.1"\n')
    # the config file alone: the suite's EDGEFLEET_* variables would add "+ environment"
    alone = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    done = cli("serve", "--config", str(config), "--state-dir", str(tmp_path), env=alone)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f'{config}: mqtt: protocol must be "5", "3.1.1" or "auto", got \'3.1\'' in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


async def test_a_3_1_1_client_gets_its_reply_from_an_mqtt_5_agent(mqtt_broker: MosquittoBroker) -> None:
    """The JSON fallback works whatever the agent speaks: a 3.1.1 hub on a broker that has both."""
    async def answer(message: InboundMessage) -> None:
        await link.reply(message, {"ok": True})

    settings = MqttSettings(host=mqtt_broker.host, port=mqtt_broker.port, device_id="dev-5", reconnect_min_s=0.2)
    async with MqttLink(settings) as link:
        await link.wait_connected(10)
        await link.subscribe(link.topics.cmd, answer)
        assert link.status.protocol == "5"
        with Watcher(mqtt_broker, "test/replies/#", protocol=V311) as hub:
            hub.publish(link.topics.cmd, json.dumps({"command": "x", "response_topic": "test/replies/5",
                                                     "correlation": "k1"}))
            (got,) = await hub.wait("test/replies/5")
            hub.publish(link.topics.cmd, json.dumps({"command": "x", "response_topic": "test/replies/#"}))
            hub.publish(link.topics.cmd, json.dumps({"command": "x", "response_topic": "test/replies/6"}))
            replies = await hub.wait("test/replies/#", count=2)
    assert json.loads(got.payload) == {"ok": True, "correlation": "k1"}
    # a wildcard is no topic to reply on: ignored, and the next command is answered (no correlation: none echoed)
    assert [(r.topic, json.loads(r.payload)) for r in replies][1] == ("test/replies/6", {"ok": True})


def test_auto_falls_back_on_a_refusal_or_two_closes_and_never_after_a_connect() -> None:
    refused = ProtocolChoice("auto")
    assert refused.refused(UNSUPPORTED_PROTOCOL_VERSION) and refused.name == "3.1.1"
    closed = ProtocolChoice("auto")
    assert not closed.closed_before_connack() and closed.name == "5"  # one dropped connection is not a refusal
    assert closed.closed_before_connack() and closed.name == "3.1.1"
    settled = ProtocolChoice("auto")
    assert settled.connected() and not settled.connected()  # "using MQTT 5" is said once
    assert not settled.closed_before_connack() and not settled.closed_before_connack()
    assert not settled.refused(UNSUPPORTED_PROTOCOL_VERSION) and settled.name == "5"
    fixed = ProtocolChoice("5")
    assert not fixed.refused(UNSUPPORTED_PROTOCOL_VERSION) and fixed.name == "5"
