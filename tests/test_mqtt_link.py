"""The shared MQTT link against a real mosquitto: acks, retained state, Last Will,
reconnects, subscriptions restored, command replies, TLS and passwords."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mqtt_broker import MosquittoBroker, Watcher

from sync.errors import LinkClosedError, PublishRefusedError
from sync.mqtt import ConnectInfo, InboundMessage, MqttLink, MqttSettings

REPO = Path(__file__).resolve().parent.parent


def settings_for(broker: MosquittoBroker, **changes: object) -> MqttSettings:
    base = MqttSettings(host=broker.host, port=broker.port, device_id="dev-1", group="lab",
                        reconnect_min_s=0.2, reconnect_max_s=1.0, keepalive_s=5)
    return replace(base, **changes)  # type: ignore[arg-type]


async def test_publish_resolves_on_ack_and_the_retained_state_says_online_then_shutdown(mqtt_broker):
    link = MqttLink(settings_for(mqtt_broker), state_fields=lambda: {"models": {"chat": {"version": "v3"}}})
    await link.start()
    await link.wait_connected(10)
    with Watcher(mqtt_broker, "edgefleet/v1/devices/dev-1/#") as watcher:
        await link.publish(link.topics.update, {"state": "queued"})
        (update,) = await watcher.wait(link.topics.update)
        assert json.loads(update.payload) == {"state": "queued"}
        (state,) = await watcher.wait(link.topics.state)  # retained birth, delivered on subscribe
        birth = json.loads(state.payload)
        assert state.retain and birth["online"] is True and birth["schema"] == "edgefleet.state/1"
        assert birth["device_id"] == "dev-1" and birth["group"] == "lab"
        assert birth["models"] == {"chat": {"version": "v3"}}
        await link.stop()
        offline = json.loads(watcher.wait_for(link.topics.state, 2)[-1].payload)
    assert offline["online"] is False and offline["reason"] == "shutdown"
    with pytest.raises(LinkClosedError):
        await link.publish(link.topics.update, "late")
    # a newcomer sees the retained offline state
    with Watcher(mqtt_broker, link.topics.state) as late:
        assert json.loads(late.wait_for(link.topics.state)[0].payload)["online"] is False


def test_last_will_marks_a_killed_process_offline(mqtt_broker):
    script = textwrap.dedent(f"""
        import asyncio
        from sync.mqtt import MqttLink, MqttSettings
        async def main():
            link = MqttLink(MqttSettings(host="127.0.0.1", port={mqtt_broker.port}, device_id="doomed"))
            await link.start()
            await link.wait_connected(10)
            await link.publish_state()
            print("up", flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        with Watcher(mqtt_broker, "edgefleet/v1/devices/doomed/state") as watcher:
            assert json.loads(watcher.wait_for("edgefleet/v1/devices/doomed/state")[0].payload)["online"] is True
            os.kill(proc.pid, signal.SIGKILL)
            last = json.loads(watcher.wait_for("edgefleet/v1/devices/doomed/state", 2)[-1].payload)
    finally:
        proc.kill()
        proc.wait()
    assert last == {"schema": "edgefleet.state/1", "device_id": "doomed", "group": "default", "online": False,
                    "reason": "connection lost"}


async def test_subscriptions_and_birth_come_back_after_the_broker_restarts(mqtt_broker):
    link = MqttLink(settings_for(mqtt_broker))
    connects: list[ConnectInfo] = []
    lost: list[str] = []
    received: list[InboundMessage] = []

    async def on_connect(info: ConnectInfo) -> None:
        connects.append(info)

    async def on_lost(reason: str) -> None:
        lost.append(reason)

    async def handler(message: InboundMessage) -> None:
        received.append(message)

    link.add_connect_hook(on_connect)
    link.add_disconnect_hook(on_lost)
    async with link:
        await link.wait_connected(10)
        await link.subscribe(link.topics.cmd, handler)
        mqtt_broker.restart()  # persistence off: the broker forgot our session and our subscription
        await _until(lambda: link.status.connects == 2)
        await _until(lambda: len(connects) == 2)
        with Watcher(mqtt_broker, link.topics.state) as watcher:
            assert json.loads((await watcher.wait(link.topics.state))[0].payload)["online"] is True
            await _until(lambda: link.connected)
            await asyncio.sleep(0.2)  # the re-sent SUBSCRIBE is on its way
            watcher.publish(link.topics.cmd, b"one")
            watcher.publish(link.topics.cmd, b"two")
            await _until(lambda: len(received) == 2)
    assert [m.payload for m in received] == [b"one", b"two"]
    assert [c.count for c in connects] == [1, 2] and connects[1].session_present is False
    assert len(lost) == 1 and link.status.disconnects == 1


async def test_a_publish_made_while_the_broker_is_down_completes_when_it_returns(mqtt_broker):
    link = MqttLink(settings_for(mqtt_broker, reconnect_min_s=1.0, reconnect_max_s=1.0))
    async with link:
        await link.wait_connected(10)
        mqtt_broker.stop()
        await _until(lambda: not link.connected)
        sending = asyncio.create_task(link.publish(link.topics.telemetry, b"while down"))
        await asyncio.sleep(0.5)
        assert not sending.done()
        await asyncio.to_thread(mqtt_broker.start)
        with Watcher(mqtt_broker, link.topics.telemetry) as watcher:  # subscribed before the link's retry
            await asyncio.wait_for(sending, 15)
            assert (await watcher.wait(link.topics.telemetry))[0].payload == b"while down"


async def test_a_command_is_answered_on_its_response_topic_with_its_correlation_data(mqtt_broker):
    link = MqttLink(settings_for(mqtt_broker))

    async def on_cmd(message: InboundMessage) -> None:
        await link.reply(message, {"ok": True, "echo": message.payload.decode()})

    async with link:
        await link.wait_connected(10)
        await link.subscribe(link.topics.cmd, on_cmd)
        with Watcher(mqtt_broker, "hub/replies/#") as hub:
            hub.publish(link.topics.cmd, b"check-now", response_topic="hub/replies/42", correlation_data=b"\x00\x2a")
            (answer,) = await hub.wait("hub/replies/42")
    assert json.loads(answer.payload) == {"ok": True, "echo": "check-now"}
    assert answer.correlation_data == b"\x00\x2a"


# ---- TLS, passwords, ACL refusals ---------------------------------------------------------------


def _tls_files(tmp: Path) -> tuple[Path, Path, Path]:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


async def test_tls_with_password_connects_and_the_broker_can_refuse_a_publish(tmp_path):
    ca, cert, key = _tls_files(tmp_path)
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "agent", "correct horse"], check=True)
    acl = tmp_path / "acl"
    acl.write_text("user agent\ntopic readwrite edgefleet/#\n")
    broker = MosquittoBroker(tmp_path)
    broker.extra_config = (f"listener {broker.port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
                           f"allow_anonymous false\npassword_file {passwords}\nacl_file {acl}\n")
    secret = tmp_path / "mqtt-password"
    secret.write_text("correct horse\n")
    broker.start()
    try:
        good = settings_for(broker, tls=True, ca_file=str(ca), username="agent", password_file=str(secret))
        async with MqttLink(good) as link:
            await link.wait_connected(10)
            await link.publish(link.topics.update, b"over TLS")
            with pytest.raises(PublishRefusedError, match="Not authorized"):
                await link.publish("elsewhere/x", b"outside the ACL")
        wrong = replace(good, password_file=None, password="battery staple")
        async with MqttLink(wrong) as refused:
            await _until(lambda: refused.status.last_error is not None)
            assert not refused.connected
            assert "refused" in (refused.status.last_error or "")
    finally:
        broker.stop()


async def _until(condition, timeout_s: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_the_agent_says_online_with_its_models_and_offline_at_shutdown(mqtt_broker, state_dir):
    from conftest import EMBED, demo_config, start_agent

    from agent.config import TelemetryConfig

    config = replace(demo_config(state_dir, models=(EMBED,)), mqtt=settings_for(mqtt_broker, device_id="agent-1"),
                     telemetry=TelemetryConfig(enabled=False))
    topic = "edgefleet/v1/devices/agent-1/state"
    with Watcher(mqtt_broker, topic) as watcher:
        async with start_agent(config):
            await _until(lambda: any(json.loads(m.payload).get("models", {}).get(EMBED, {}).get("state") == "ready"
                                     for m in watcher.on(topic)))
            seen = len(watcher.on(topic))
        offline = json.loads((await watcher.wait(topic, seen + 1))[-1].payload)
    birth = next(json.loads(m.payload) for m in watcher.on(topic) if json.loads(m.payload)["online"])
    assert birth["agent_version"] and len(birth["boot_id"]) >= 32
    ready = [json.loads(m.payload) for m in watcher.on(topic)][seen - 1]
    assert ready["online"] is True and ready["models"][EMBED]["version"]
    assert offline["online"] is False and offline["reason"] == "shutdown"


async def test_a_model_change_during_a_state_publish_is_published_after_it(mqtt_broker):
    """A status change that lands while the retained state is being published (its payload
    already built) must not be lost: the fleet would see "loading" for a model that is ready."""
    from agent.fleet.link import Republisher

    model = {"state": "loading"}
    republisher: Republisher | None = None
    publishing = False

    def fields() -> dict[str, object]:
        snapshot = {"models": {"chat": dict(model)}}
        if publishing and model["state"] == "loading":  # the model turns ready mid-publish
            model["state"] = "ready"
            assert republisher is not None
            republisher.soon()
        return snapshot

    link = MqttLink(settings_for(mqtt_broker), state_fields=fields)
    await link.start()
    try:
        await link.wait_connected(10)
        with Watcher(mqtt_broker, link.topics.state) as watcher:
            republisher = Republisher(link, link.publish_state, "state")
            publishing = True
            republisher.soon()
            await _until(lambda: any(json.loads(m.payload)["models"]["chat"]["state"] == "ready"
                                     for m in watcher.on(link.topics.state)))
            states = [json.loads(m.payload)["models"]["chat"]["state"] for m in watcher.on(link.topics.state)]
            assert states[-1] == "ready" and "loading" in states
            await republisher.close()
    finally:
        await link.stop()
