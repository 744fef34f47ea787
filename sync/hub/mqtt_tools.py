"""The hub's side of MQTT: ring a doorbell, and read the fleet's retained state.

The hub CLI runs for a second, so it uses paho-mqtt's one-shot helpers and a
short-lived client rather than the agent's long-lived link. Both only touch
topics the agents also use (sync/mqtt/topics.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from ..errors import HubUnreachable


@dataclass(frozen=True)
class Broker:
    host: str
    port: int = 1883

    @classmethod
    def parse(cls, text: str) -> Broker:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
        try:
            return cls(host or text, int(port) if port else 1883)
        except ValueError:
            raise ValueError(f"broker {text!r}: use HOST or HOST:PORT") from None


def ring_doorbell(broker: Broker, topic: str, payload: bytes, timeout_s: float = 10.0) -> None:
    """Publish a retained doorbell (QoS 1, waits for the broker's ack): agents that connect
    later still hear it."""
    client = _client()
    with _connected(client, broker):
        info = client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(timeout_s)
        if not info.is_published():
            raise HubUnreachable(f"MQTT broker {broker.host}:{broker.port}: no ack within {timeout_s:g}s")


def _client() -> paho.Client:
    return paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)


@contextlib.contextmanager
def _connected(client: paho.Client, broker: Broker) -> Iterator[None]:
    """`client` connected to `broker`, its network thread running, for the block."""
    try:
        client.connect(broker.host, broker.port)
    except OSError as exc:
        raise HubUnreachable(f"MQTT broker {broker.host}:{broker.port}: {exc}") from None
    client.loop_start()
    try:
        yield
    finally:
        client.disconnect()
        client.loop_stop()


def read_retained(broker: Broker, topic_filters: list[str], wait_s: float = 1.0) -> dict[str, Any]:
    """topic -> parsed JSON payload of the messages that arrive within `wait_s` (the retained
    ones arrive at once)."""
    received: dict[str, Any] = {}
    lock = threading.Lock()
    client = _client()

    def on_connect(client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        for topic_filter in topic_filters:
            client.subscribe(topic_filter, qos=1)

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            body = orjson.loads(msg.payload) if msg.payload else None
        except orjson.JSONDecodeError:
            body = None
        with lock:
            received[msg.topic] = body

    client.on_connect = on_connect
    client.on_message = on_message
    with _connected(client, broker):
        time.sleep(wait_s)
    with lock:
        return dict(received)


def follow_updates(broker: Broker, prefix: str, seconds: float, until: str | None,
                   emit: Callable[[dict[str, Any]], None]) -> bool:
    """Call `emit` with each update transition as it arrives (not the retained ones) for
    `seconds` (0: until interrupted) or until one reaches state `until`; returns whether it did."""
    done = threading.Event()
    client = _client()

    def on_connect(client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(f"{prefix}/devices/+/update", qos=1)

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.retain:
            return
        try:
            body = orjson.loads(msg.payload)
        except orjson.JSONDecodeError:
            return
        if isinstance(body, dict):
            emit(body)
            if until is not None and body.get("state") == until:
                done.set()

    client.on_connect = on_connect
    client.on_message = on_message
    with _connected(client, broker):
        return done.wait(seconds or None)


def fleet_status(broker: Broker, prefix: str, wait_s: float = 1.0) -> list[dict[str, Any]]:
    """One row per device from its retained state (online, models) and update (last job
    transition) topics."""
    messages = read_retained(broker, [f"{prefix}/devices/+/state", f"{prefix}/devices/+/update"], wait_s)
    devices: dict[str, dict[str, Any]] = {}
    for topic, body in messages.items():
        parts = topic.split("/")
        if len(parts) < 3 or not isinstance(body, dict):
            continue
        device, kind = parts[-2], parts[-1]
        row = devices.setdefault(device, {"device": device, "group": None, "online": None, "models": {},
                                          "update": None})
        if kind == "state":
            row["group"] = body.get("group", row["group"])
            row["online"] = body.get("online")
            models = body.get("models")
            if isinstance(models, dict):
                row["models"] = {n: (m.get("version") if isinstance(m, dict) else m) for n, m in models.items()}
        elif kind == "update":
            row["update"] = {k: body.get(k) for k in ("state", "model", "version", "code", "message", "seq", "at")}
            row["group"] = row["group"] or body.get("group")
            serving = body.get("serving")
            if not row["models"] and isinstance(serving, dict):
                row["models"] = dict(serving)
    return [devices[d] for d in sorted(devices)]
