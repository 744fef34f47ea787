"""The hub's side of MQTT: ring a doorbell, and read the fleet's retained state.

The hub CLI runs for a second, so it uses paho-mqtt's one-shot helpers and a
short-lived client rather than the agent's long-lived link. Both only touch
topics the agents also use (sync/mqtt/topics.py). Like the agent, they speak MQTT 5
and fall back to 3.1.1 when the broker refuses MQTT 5 (``Broker.protocol``); none
of them needs an MQTT 5 property.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from security.tls import client_context

from ..errors import HubUnreachable
from ..mqtt.protocol import PROTOCOLS, UNSUPPORTED_PROTOCOL_VERSION, V5, V311


@dataclass(frozen=True)
class Broker:
    host: str
    port: int = 1883
    #: "5", "3.1.1", or "auto": MQTT 5, then 3.1.1 when the broker refuses MQTT 5
    protocol: str = "auto"
    #: TLS (the broker's certificate checked against `ca_file`, else the system's trust store);
    #: on by itself when a CA or client certificate is given
    tls: bool = False
    ca_file: str | None = None
    #: the hub's client certificate and key, for a broker that authenticates by certificate
    #: (``use_identity_as_username``: its CN is the user the ACL's ``user hub`` block names)
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f'MQTT protocol must be "5", "3.1.1" or "auto", got {self.protocol!r}')
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("the hub's MQTT client certificate and key go together (--mqtt-cert, --mqtt-key)")
        if self.ca_file is not None or self.cert_file is not None:
            object.__setattr__(self, "tls", True)

    def configure(self, client: paho.Client) -> None:
        """TLS and credentials on a new paho client (every hub client is made through this).
        Raises HubUnreachable naming a file that cannot be used."""
        if self.tls:
            try:
                client.tls_set_context(client_context(self.ca_file, self.cert_file, self.key_file))
            except ValueError as exc:
                raise HubUnreachable(f"MQTT TLS: {exc}") from None
        if self.username is not None:
            client.username_pw_set(self.username, self.password)

    def client(self, version: MQTTProtocolVersion, client_id: str = "", **options: Any) -> paho.Client:
        """A paho client for this broker (TLS and credentials set), not yet connected; `options`
        go to paho (``manual_ack``, and ``clean_session`` for MQTT 3.1.1)."""
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version, **options)
        self.configure(client)
        return client

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
    with _connected(broker) as client:
        info = client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(timeout_s)
        if not info.is_published():
            raise HubUnreachable(f"MQTT broker {broker.host}:{broker.port}: no ack within {timeout_s:g}s")


OnConnect = Callable[[paho.Client], None]
OnMessage = Callable[[paho.Client, Any, paho.MQTTMessage], None]


@contextlib.contextmanager
def _connected(broker: Broker, on_connect: OnConnect | None = None, on_message: OnMessage | None = None,
               timeout_s: float = 10.0) -> Iterator[paho.Client]:
    """A client connected to `broker` (its CONNACK received), its network thread running, for
    the block; `on_connect` runs after every connect (subscribe there)."""
    versions = {"5": [V5], "3.1.1": [V311], "auto": [V5, V311]}[broker.protocol]
    for version in versions:
        client, refused = _connect(broker, version, on_connect, on_message, timeout_s)
        if client is not None:
            break
        if version != versions[-1] and (refused is None or refused.value == UNSUPPORTED_PROTOCOL_VERSION):
            continue  # the broker refused MQTT 5 (or closed the connection at its CONNECT): try 3.1.1
        raise HubUnreachable(f"MQTT broker {broker.host}:{broker.port} refused the connection: "
                             f"{'it closed the connection at the CONNECT' if refused is None else refused}")
    assert client is not None
    try:
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def _connect(broker: Broker, version: MQTTProtocolVersion, on_connect: OnConnect | None,
             on_message: OnMessage | None, timeout_s: float) -> tuple[paho.Client | None, ReasonCode | None]:
    """(the connected client, None), or (None, the CONNACK's failure reason, None if the broker
    closed the connection without one)."""
    client = broker.client(version)
    answered = threading.Event()
    reasons: list[ReasonCode] = []

    def connected(client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        reasons.append(reason)
        answered.set()
        if not reason.is_failure and on_connect is not None:
            on_connect(client)

    client.on_connect = connected
    client.on_disconnect = lambda *args: answered.set()
    if on_message is not None:
        client.on_message = on_message
    try:
        client.connect(broker.host, broker.port)
    except OSError as exc:  # ssl.SSLError too: the handshake failed (wrong CA, refused certificate)
        raise HubUnreachable(f"MQTT broker {broker.host}:{broker.port}: {exc}") from None
    client.loop_start()
    answered.wait(timeout_s)
    if reasons and not reasons[0].is_failure:
        return client, None
    client.disconnect()
    client.loop_stop()
    if not answered.is_set():
        raise HubUnreachable(f"MQTT broker {broker.host}:{broker.port}: no answer to the CONNECT within "
                             f"{timeout_s:g}s")
    return None, reasons[0] if reasons else None


def negotiate_protocol(broker: Broker, timeout_s: float = 10.0) -> MQTTProtocolVersion:
    """The MQTT version `broker` takes (per `broker.protocol`: with "auto", 5 unless it refuses
    it), for a long-lived hub client that builds its own paho client. Raises `HubUnreachable`."""
    with _connected(broker, timeout_s=timeout_s) as client:
        return client.protocol


def read_retained(broker: Broker, topic_filters: list[str], wait_s: float = 1.0) -> dict[str, Any]:
    """topic -> parsed JSON payload of the messages that arrive within `wait_s` (the retained
    ones arrive at once)."""
    received: dict[str, Any] = {}
    lock = threading.Lock()

    def on_connect(client: paho.Client) -> None:
        for topic_filter in topic_filters:
            client.subscribe(topic_filter, qos=1)

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            body = orjson.loads(msg.payload) if msg.payload else None
        except orjson.JSONDecodeError:
            body = None
        with lock:
            received[msg.topic] = body

    with _connected(broker, on_connect, on_message):
        time.sleep(wait_s)
    with lock:
        return dict(received)


def follow_updates(broker: Broker, prefix: str, seconds: float, until: str | None,
                   emit: Callable[[dict[str, Any]], None]) -> bool:
    """Call `emit` with each update transition as it arrives (not the retained ones) for
    `seconds` (0: until interrupted) or until one reaches state `until`; returns whether it did."""
    done = threading.Event()

    def on_connect(client: paho.Client) -> None:
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

    with _connected(broker, on_connect, on_message):
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


def broker_protocol(broker: Broker) -> MQTTProtocolVersion:
    """The MQTT version to speak to `broker` (MQTT 5 unless it only takes 3.1.1, as RabbitMQ's
    plugin does); MQTT 5 while it cannot be reached, as paho then keeps trying."""
    try:
        return negotiate_protocol(broker, timeout_s=5.0)
    except HubUnreachable:
        return MQTTProtocolVersion.MQTTv311 if broker.protocol == "3.1.1" else MQTTProtocolVersion.MQTTv5


def refusal_cause(broker: Broker) -> str:
    """Why a broker closed the connection before its CONNACK: with TLS, its alert about our
    certificate (security/tls_probe.py), else that it closed it."""
    if broker.tls:
        from security.tls_probe import handshake_outcome

        try:
            cause = handshake_outcome(broker.host, broker.port,
                                      client_context(broker.ca_file, broker.cert_file, broker.key_file))
        except (OSError, ValueError) as exc:
            cause = str(exc)
        if cause is not None:
            return f"TLS: {cause} (the hub's certificate: --mqtt-cert / --mqtt-key)"
    return "it closed the connection before answering the CONNECT"
