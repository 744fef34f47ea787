"""`edgefleet hub webhooks`: read the fleet's events from MQTT, queue them on disk, post them.

    paho thread --(call_soon_threadsafe)--> ingest task --(db thread: derive + one transaction)
        --> PUBACK to the broker, wake the senders --> one Sender task per endpoint (delivery.py)

The MQTT session is persistent (a fixed client id per hub directory, clean start off, 7 days'
expiry) and messages are acknowledged by hand, *after* their events are committed to the
queue: a message that arrives while this process is stopped waits in the broker, and one
that arrived just before a crash is sent again by the broker, so nothing falls between the
broker and the disk. The retained topics are read again after every connect; events.py's
memory makes that post nothing twice.

What an operator must act on (an endpoint failing, events dropped or given up) is published
retained on ``{prefix}/hub/webhooks`` (edgefleet.webhooks/1) as well as logged, with a Last
Will saying the process is gone. SIGTERM / SIGINT end it; an attempt cut short stays queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..mqtt_tools import Broker, broker_protocol
from ..run import run_until_signalled
from .config import Endpoint
from .delivery import Sender
from .events import derive, topic_filters
from .store import WebhookStore

log = logging.getLogger("edgefleet.hub.webhooks")
STATUS_SCHEMA = "edgefleet.webhooks/1"
SESSION_EXPIRY_S = 7 * 24 * 3600
#: the status message is sent at most this often (it changes with every event)
STATUS_EVERY_S = 1.0
#: a queue write the disk refused is tried again after this long (nothing behind it is acked)
DISK_RETRY_S = 5.0


def status_topic(prefix: str) -> str:
    return f"{prefix}/hub/webhooks"


@dataclass
class Message:
    topic: str
    payload: bytes
    retained: bool
    mid: int
    qos: int
    connection: int


@dataclass
class WebhookService:
    hub_dir: Path
    broker: Broker
    endpoints: list[Endpoint]
    prefix: str = "edgefleet/v1"
    clock: Callable[[], float] = time.time
    events: Counter[str] = field(default_factory=Counter)
    ignored: Counter[str] = field(default_factory=Counter)
    connected: bool = False

    def __post_init__(self) -> None:
        self.store = WebhookStore(self.hub_dir)
        digest = hashlib.sha256(str(Path(self.hub_dir).resolve()).encode()).hexdigest()[:12]
        self.client_id = f"edgefleet-hub-webhooks-{digest}"
        self._version = broker_protocol(self.broker)
        # a persistent session: what happens while this process is down waits in the broker
        session = {"clean_session": False} if self._version == MQTTProtocolVersion.MQTTv311 else {}
        self._client = self.broker.client(self._version, self.client_id, manual_ack=True, **session)
        self._client.reconnect_delay_set(1, 30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.will_set(status_topic(self.prefix), orjson.dumps({"schema": STATUS_SCHEMA, "online": False}),
                              qos=1, retain=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._connection = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="webhooks-db")
        self._senders: dict[str, Sender] = {}
        self._status_dirty = asyncio.Event()
        self._dropped: Counter[str] = Counter()

    # ---- paho's thread: hand over, nothing else -------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT broker %s:%d refused the connection: %s", self.broker.host, self.broker.port, reason)
            return
        for topic_filter in topic_filters(self.prefix):
            client.subscribe(topic_filter, qos=1)
        self._call(self._connected, True)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._call(self._connected, False)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        # the connection number is read on the loop, in order with _connected: a PUBACK is only
        # ever sent on the connection that carried the message
        self._call(self._received, msg.topic, bytes(msg.payload), bool(msg.retain), msg.mid, msg.qos)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                loop.call_soon_threadsafe(fn, *args)

    # ---- the loop ---------------------------------------------------------------------------

    def _connected(self, up: bool) -> None:
        if up:
            self._connection += 1
        if up != self.connected:
            log.info("MQTT broker %s:%d %s", self.broker.host, self.broker.port, "connected" if up else "lost")
        self.connected = up
        self._status_dirty.set()

    def _received(self, topic: str, payload: bytes, retained: bool, mid: int, qos: int) -> None:
        self._inbox.put_nowait(Message(topic, payload, retained, mid, qos, self._connection))

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set."""
        self._loop = asyncio.get_running_loop()
        await self._db(self.store.open)
        self._baseline = self.store.first_run
        if self._baseline:
            log.info("first run for %s: what the broker has retained is taken as the fleet's state, not posted",
                     self.hub_dir)
        async with aiohttp.ClientSession() as session:
            tasks: list[asyncio.Task[Any]] = []
            for endpoint in self.endpoints:
                sender = Sender(endpoint, self.store, self._db, session, asyncio.Event(), self._status_dirty.set)
                self._senders[endpoint.name] = sender
                tasks.append(asyncio.create_task(sender.run(), name=f"webhook {endpoint.name}"))
            tasks.append(asyncio.create_task(self._ingest(), name="webhooks ingest"))
            tasks.append(asyncio.create_task(self._publish_status(), name="webhooks status"))
            if self._version == MQTTProtocolVersion.MQTTv5:
                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = SESSION_EXPIRY_S
                self._client.connect_async(self.broker.host, self.broker.port, keepalive=30, clean_start=False,
                                           properties=properties)
            else:  # 3.1.1: the session is kept until the broker's own expiry
                self._client.connect_async(self.broker.host, self.broker.port, keepalive=30)
            self._client.loop_start()
            log.info("webhooks for %s: %d endpoint(s) (%s), MQTT %s:%d", self.hub_dir, len(self.endpoints),
                     ", ".join(e.name for e in self.endpoints), self.broker.host, self.broker.port)
            stopper = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
                for task in tasks:  # none ends on its own: one that did failed
                    if task.done() and not task.cancelled() and (failure := task.exception()) is not None:
                        raise failure
            finally:
                for task in [*tasks, stopper]:
                    task.cancel()
                await asyncio.gather(*tasks, stopper, return_exceptions=True)
                with contextlib.suppress(RuntimeError, ValueError, sqlite3.Error):  # a goodbye not sent is no error
                    goodbye = await self._status(online=False) | {"at": self.clock()}
                    self._client.publish(status_topic(self.prefix), orjson.dumps(goodbye), qos=1,
                                         retain=True).wait_for_publish(2)
                self._client.disconnect()
                await asyncio.to_thread(self._client.loop_stop)
                self._loop = None
                await self._db(self.store.close)
                self._executor.shutdown()

    async def _ingest(self) -> None:
        """Messages in arrival order: events derived and queued, then acknowledged."""
        while True:
            message = await self._inbox.get()
            baseline = self._baseline and message.retained and message.connection == 1
            while True:
                try:
                    reason, kinds, queued, dropped = await self._db(self._take, message, baseline, self.clock())
                    break
                except sqlite3.Error as exc:
                    log.error("webhooks: cannot write the queue %s (%s); trying again in %gs, nothing more is "
                              "read meanwhile", self.store.path, exc, DISK_RETRY_S)
                    await asyncio.sleep(DISK_RETRY_S)
            if message.qos and message.connection == self._connection and self.connected:
                self._client.ack(message.mid, message.qos)
            if reason is not None:
                self.ignored[reason] += 1
                total = sum(self.ignored.values())
                if total & (total - 1) == 0:
                    log.warning("webhooks: ignored %d message(s) so far: %s (last on %s)", total,
                                dict(self.ignored), message.topic)
            self.events.update(kinds)
            for name in queued:
                self._senders[name].wake.set()
            for name, count in dropped.items():
                before = self._dropped[name]
                self._dropped[name] += count
                if before.bit_length() != self._dropped[name].bit_length():  # the first, then at doublings
                    log.warning("webhook %s: its queue is full (max_queue): %d oldest event(s) dropped since this "
                                "process started", name, self._dropped[name])
            self._status_dirty.set()

    def _take(self, message: Message, baseline: bool,
              now: float) -> tuple[str | None, list[str], set[str], dict[str, int]]:
        """On the db thread: derive the message's events and queue them, in one transaction.
        Returns why it was ignored (or None), the kinds of its events, the endpoints that got
        some, and the events dropped per endpoint to keep the bound."""
        derived = derive(self.prefix, message.topic, message.payload, self.store.memory(message.topic), baseline,
                         now)
        rows = [(e.name, e.max_queue, event) for event in derived.events for e in self.endpoints
                if e.wants(event.kind)]
        dropped = self.store.record(message.topic, derived.remember, rows) if rows or derived.remember else {}
        return derived.ignored, [event.kind for event in derived.events], {name for name, _, _ in rows}, dropped

    async def _status(self, online: bool = True) -> dict[str, Any]:
        stats = await self._db(self.store.stats, [e.name for e in self.endpoints])
        endpoints = {}
        for endpoint in self.endpoints:
            sender = self._senders.get(endpoint.name)
            endpoints[endpoint.name] = stats[endpoint.name] | {
                "failing_since": sender.failing_since if sender else None,
                "failures": sender.failures if sender else 0,
                "last_error": sender.last_error if sender else None,
                "last_delivered_at": sender.last_delivered_at if sender else None,
            }
        return {"schema": STATUS_SCHEMA, "online": online, "connected": self.connected, "endpoints": endpoints,
                "events": dict(self.events), "ignored": dict(self.ignored)}

    async def _publish_status(self) -> None:
        """The status, retained, when it changed, at most every STATUS_EVERY_S."""
        last: dict[str, Any] = {}
        while True:
            await self._status_dirty.wait()
            self._status_dirty.clear()
            if self.connected:
                status = await self._status()
                if status != last:
                    self._client.publish(status_topic(self.prefix), orjson.dumps(status | {"at": self.clock()}),
                                         qos=1, retain=True)
                    last = status
            await asyncio.sleep(STATUS_EVERY_S)


def run_webhooks(hub_dir: Path, broker: Broker, prefix: str, endpoints: list[Endpoint]) -> None:
    """`edgefleet hub webhooks`: run until SIGTERM or SIGINT."""

    async def main(stop: asyncio.Event) -> None:
        await WebhookService(hub_dir, broker, endpoints, prefix).run(stop)
        log.info("webhooks stopped")

    run_until_signalled(main)
