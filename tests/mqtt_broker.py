"""A real mosquitto broker on a free loopback port, and a plain paho subscriber to watch it.

Used by every test that talks MQTT (telemetry, signed updates). The broker can be
stopped and started again on the same port (persistence off, so a restart loses
sessions and retained messages exactly like a broker that crashed without a
store); `MosquittoBroker.kill()` is the rough version (SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MosquittoBroker:
    """One mosquitto process; `extra_config` lines go into its config (TLS, passwords, a bridge...).
    With `persistence_dir` it keeps sessions, queued and retained messages there across restarts."""

    def __init__(self, workdir: Path, port: int | None = None, extra_config: str = "",
                 persistence_dir: Path | None = None) -> None:
        self.workdir = workdir
        self.persistence_dir = persistence_dir
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.extra_config = extra_config
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"mosquitto-{self.port}.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        if self.running:
            return
        if not os.path.exists(MOSQUITTO):
            raise RuntimeError("mosquitto is not installed (scripts/setup.sh --test installs it)")
        listener = self.extra_config if "listener" in self.extra_config else (
            f"listener {self.port} {self.host}\nallow_anonymous true\n" + self.extra_config)
        conf = self.workdir / f"mosquitto-{self.port}.conf"
        # As root, mosquitto would switch to the "mosquitto" user, who cannot read pytest's tmp dirs.
        user = "user root\n" if os.geteuid() == 0 else ""
        persistence = "persistence false\n"
        if self.persistence_dir is not None:
            self.persistence_dir.mkdir(parents=True, exist_ok=True)
            persistence = f"persistence true\npersistence_location {self.persistence_dir}/\n"
        conf.write_text(f"{persistence}{user}log_dest stderr\nlog_type error\nlog_type warning\n{listener}\n")
        log = open(self.log_path, "ab")  # noqa: SIM115 - the process keeps it
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.5):
                return
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout_s}s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its password and ACL files, keeping clients and sessions."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def restart(self) -> None:
        self.stop()
        self.start()


class BrokerAddress(Protocol):
    """Where a test broker listens (mosquitto here, RabbitMQ in tests/rabbitmq_broker.py)."""

    host: str
    port: int


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    correlation_data: bytes | None
    at: float


class Watcher:
    """A paho client on its own thread that records what arrives (what an operator would see)."""

    def __init__(self, broker: BrokerAddress, *topics: str, client_id: str | None = None,
                 username: str | None = None, password: str | None = None,
                 protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5, session_expiry_s: int | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        """`protocol`: MQTT 5 unless told (MQTTv311 for a 3.1.1-only broker, which
        carries no response topic or correlation data). `session_expiry_s`: a persistent
        session (what a hub's capture keeps across a broker restart with persistence).
        `tls`: a client context (CA, and a client certificate for identity)."""
        self.broker = broker
        self._session_expiry_s = session_expiry_s
        self.messages: list[Received] = []
        self._cv = threading.Condition()
        self._topics = topics
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"watcher-{time.monotonic_ns()}",
                                  protocol=protocol)
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set_context(tls)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self._subscribed.set()

    def _on_connect(self, client: paho.Client, userdata: object, flags: object, reason: object,
                    props: object) -> None:
        for topic in self._topics:
            client.subscribe(topic, qos=1)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        with self._cv:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain),
                                          getattr(msg.properties, "CorrelationData", None), time.monotonic()))
            self._cv.notify_all()

    def __enter__(self) -> Watcher:
        if self._session_expiry_s is not None:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self._session_expiry_s
            self.client.connect(self.broker.host, self.broker.port, clean_start=False, properties=props)
        else:
            self.client.connect(self.broker.host, self.broker.port)
        self.client.loop_start()
        if self._topics and not self._subscribed.wait(10):
            raise RuntimeError("watcher: no SUBACK")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def on(self, topic: str) -> list[Received]:
        with self._cv:
            return [m for m in self.messages if paho.topic_matches_sub(topic, m.topic)]

    def wait_for(self, topic: str, count: int = 1, timeout_s: float = 15.0) -> list[Received]:
        """At least `count` messages on `topic`; raises AssertionError with what did arrive."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                got = [m for m in self.messages if paho.topic_matches_sub(topic, m.topic)]
                if len(got) >= count:
                    return got
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{len(got)} of {count} messages on {topic} within {timeout_s}s")
                self._cv.wait(remaining)

    async def wait(self, topic: str, count: int = 1, timeout_s: float = 15.0) -> list[Received]:
        """`wait_for` for async tests: the event loop keeps running (and serving) meanwhile."""
        return await asyncio.to_thread(self.wait_for, topic, count, timeout_s)

    def publish(self, topic: str, payload: bytes | str, *, retain: bool = False, response_topic: str | None = None,
                correlation_data: bytes | None = None) -> None:
        props = None
        if response_topic is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response_topic
            if correlation_data is not None:
                props.CorrelationData = correlation_data
        self.client.publish(topic, payload, qos=1, retain=retain, properties=props).wait_for_publish(10)


@contextlib.contextmanager
def running_broker(workdir: Path, **kwargs: object) -> Iterator[MosquittoBroker]:
    broker = MosquittoBroker(workdir, **kwargs)  # type: ignore[arg-type]
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
