"""The agent's one MQTT connection, owned by the asyncio side.

`MqttLink` owns a single paho-mqtt 2.x client (MQTT 5, or 3.1.1 where the broker
speaks only that: ``[mqtt] protocol``, chosen by sync/mqtt/protocol.py). It is the
only module that touches paho; telemetry, signed updates and commands all go
through it.

Threads: paho runs its own network thread (`loop_start`). That is deliberate:
paho's reconnect with exponential backoff (`reconnect_delay_set`) lives only in
`loop_forever`, which that thread runs, and the brief is to reuse it rather than
write our own. Nothing of ours runs on paho's thread except a conversion of
the callback's arguments: every callback is handed to the event loop with
`call_soon_threadsafe`, so all of the link's state is read and written on the
loop thread only. Calls into paho from the loop (`publish`, `subscribe`) are
thread-safe by paho's own locks.

What it guarantees:

- a persistent session (clean start off, session expiry), resumed after restarts
  because the client id is derived from the device id;
- a retained ``state`` message: birth (online + the caller's fields) after every
  connect, Last Will (offline, ``connection lost``) set at connect, and an
  explicit offline (``shutdown``) at a clean stop;
- `publish(...)` returns when the broker acknowledged a QoS 1 message (PUBACK);
  a message handed over while disconnected, or whose ack was lost to a
  disconnect, is re-sent by paho after the reconnect, and the call returns then.
  Callers that must survive a restart (telemetry) keep their own outbox;
- subscriptions are sent again after every (re)connect, so they survive a
  broker that lost our session; messages go to an async handler per
  subscription, in arrival order;
- connect / disconnect hooks, so consumers reconcile level-triggered after a
  reconnect; MQTT 5 response topic + correlation data for command replies.

On an MQTT 3.1.1 broker the same guarantees hold with what 3.1.1 has (a session
kept with clean_session off, no expiry); MQTT 5 properties are not sent, and a
command names its reply topic and correlation in its JSON instead (docs/mqtt.md,
"MQTT 3.1.1 brokers"). With ``protocol = "auto"`` a refusal of MQTT 5 before the
first connect replaces the paho client by a 3.1.1 one; messages already handed
to the old one are handed to the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from security.tls import client_context

from ..errors import LinkClosedError, NotConnectedError, PublishRefusedError, SubscribeRefusedError, SyncError
from .protocol import V5, ProtocolChoice, reply_fields_from_body
from .send_queue import SendQueue, SendQueueStats
from .settings import MqttSettings
from .topics import Topics

log = logging.getLogger(__name__)

STATE_SCHEMA = "edgefleet.state/1"
#: What one subscription may hold before its handler catches up; past it messages are counted and dropped.
HANDLER_QUEUE_LIMIT = 1000

Payload = bytes | str | Mapping[str, Any]


@dataclass(frozen=True)
class InboundMessage:
    """A message the broker delivered, with the MQTT 5 properties a handler may need."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None
    content_type: str | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    #: the response topic and correlation came from the command's JSON (the 3.1.1 fallback),
    #: so the reply carries the correlation in its JSON too
    reply_in_body: bool = False

    def json(self) -> Any:
        """The payload parsed as JSON (raises ValueError when it is not)."""
        return orjson.loads(self.payload)


@dataclass(frozen=True)
class ConnectInfo:
    """Passed to connect hooks: whether the broker still had our session, and which connect this is."""

    session_present: bool
    count: int


@dataclass
class LinkStatus:
    """For /metrics, telemetry and `doctor`: how the link is doing."""

    connected: bool = False
    #: the MQTT version in use ("5" or "3.1.1"); with protocol = "auto", the one being tried
    protocol: str = "5"
    connects: int = 0
    disconnects: int = 0
    last_error: str | None = None
    #: inbound messages dropped because a handler fell more than HANDLER_QUEUE_LIMIT behind
    dropped_inbound: int = 0
    #: outbound messages waiting in the send queues (`MqttLink.send_queue`), and what they dropped
    send: SendQueueStats = field(default_factory=SendQueueStats)


Handler = Callable[[InboundMessage], Awaitable[None]]
ConnectHook = Callable[[ConnectInfo], Awaitable[None]]
DisconnectHook = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class _Outgoing:
    """A QoS 1 message until its PUBACK: what is handed again to a replacement client."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass
class _Subscription:
    topic_filter: str
    handler: Handler
    qos: int
    queue: asyncio.Queue[InboundMessage] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None


def encode_payload(payload: Payload) -> bytes:
    """bytes as they are, str as UTF-8, a mapping as JSON."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return orjson.dumps(payload)


class MqttLink:
    """One MQTT client (5, or 3.1.1) for the whole agent; start and stop it with the app."""

    def __init__(
        self,
        settings: MqttSettings,
        state_fields: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        if not settings.enabled:
            raise ValueError("MQTT is not configured (mqtt.host is unset)")
        self.settings = settings
        self.topics = Topics(settings.topic_prefix, settings.group, settings.device_id)
        self.status = LinkStatus()
        self._state_fields = state_fields or dict
        self._client: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._connected = asyncio.Event()
        self._acks: dict[int, tuple[_Outgoing, asyncio.Future[None]]] = {}
        self._subacks: dict[int, tuple[str, asyncio.Future[None]]] = {}
        self._subscriptions: dict[str, _Subscription] = {}
        self._connect_hooks: list[ConnectHook] = []
        self._disconnect_hooks: list[DisconnectHook] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._protocol = ProtocolChoice(str(settings.protocol))
        self.status.protocol = self._protocol.name

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin connecting in the background; returns at once (the broker may be down)."""
        if self._client is not None:
            raise RuntimeError("MqttLink.start called twice")
        self._loop = asyncio.get_running_loop()
        s = self.settings
        self._client = self._new_client(self._protocol.version)
        self._client.loop_start()
        log.info("mqtt: connecting to %s:%d as %s (group %s)", s.host, s.broker_port, s.device_id, s.group)

    def _new_client(self, version: MQTTProtocolVersion) -> paho.Client:
        """A paho client for `version`, configured and connecting (its thread not yet started)."""
        s = self.settings
        v5 = version == V5
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=version,
            clean_session=None if v5 else False,  # 3.1.1: a persistent session, kept until we say otherwise
        )
        if s.tls:
            client.tls_set_context(client_context(s.ca_file, s.cert_file, s.key_file))
        if s.username is not None:
            client.username_pw_set(s.username, s.read_password())
        client.will_set(self.topics.state, self._state_payload(False, "connection lost"), qos=1, retain=True)
        client.reconnect_delay_set(s.reconnect_min_s, s.reconnect_max_s)  # type: ignore[arg-type]
        client.on_connect = self._paho_connect
        client.on_connect_fail = self._paho_connect_fail
        client.on_disconnect = self._paho_disconnect
        client.on_publish = self._paho_publish
        client.on_subscribe = self._paho_subscribe
        client.on_message = self._paho_message
        if v5:
            connect_props = Properties(PacketTypes.CONNECT)
            connect_props.SessionExpiryInterval = s.session_expiry_s
            client.connect_async(s.host or "", s.broker_port, keepalive=s.keepalive_s,
                                 clean_start=False, properties=connect_props)
        else:  # no session expiry in 3.1.1: the broker's own setting applies
            client.connect_async(s.host or "", s.broker_port, keepalive=s.keepalive_s)
        return client

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Say offline (retained, ``shutdown``), disconnect, stop paho's thread, cancel handlers."""
        if self._client is None or self._closed:
            return
        client = self._client
        if self._connected.is_set():
            try:
                await asyncio.wait_for(
                    self.publish(self.topics.state, self._state_payload(False, "shutdown"), retain=True),
                    timeout_s)
            except (TimeoutError, SyncError) as exc:
                log.warning("mqtt: could not publish the offline state at shutdown: %s", exc)
        self._closed = True
        client.disconnect()  # a normal DISCONNECT: the broker discards the Last Will
        await asyncio.to_thread(client.loop_stop)
        self._connected.clear()
        self.status.connected = False
        for _, future in [*self._acks.values(), *self._subacks.values()]:
            if not future.done():
                future.set_exception(LinkClosedError("the MQTT link stopped"))
                future.exception()
        self._acks.clear()
        self._subacks.clear()
        tasks = [*self._tasks, *(sub.task for sub in self._subscriptions.values() if sub.task)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        log.info("mqtt: stopped")

    async def __aenter__(self) -> MqttLink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- what consumers call -----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        """Return once connected; raises TimeoutError after `timeout_s`."""
        await asyncio.wait_for(self._connected.wait(), timeout_s)

    async def publish(
        self,
        topic: str,
        payload: Payload,
        qos: int = 1,
        retain: bool = False,
        *,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        content_type: str | None = None,
        message_expiry_s: int | None = None,
        user_properties: Mapping[str, str] | None = None,
    ) -> None:
        """Send a message; with QoS 1 return when the broker acknowledged it.

        Raises `PublishRefusedError` when the broker's PUBACK carries a failure
        reason, `LinkClosedError` when the link stops first. While the broker is
        away the call waits: paho re-sends after the reconnect.
        """
        client = self._live_client()
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1 (QoS 2 is not used by edgefleet)")
        props = None
        if self._protocol.version == V5:  # 3.1.1 has no properties: they are left out
            props = _publish_properties(response_topic, correlation_data, content_type, message_expiry_s,
                                        user_properties)
        out = _Outgoing(topic, encode_payload(payload), qos, retain)
        info = client.publish(topic, out.payload, qos=qos, retain=retain, properties=props)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise SyncError(f"cannot publish on {topic}: {paho.error_string(info.rc)}")
        if qos == 0:
            return
        # Registered before this coroutine yields, so the PUBACK callback (posted to the
        # loop by paho's thread) always finds it.
        future: asyncio.Future[None] = self._running_loop().create_future()
        self._acks[info.mid] = (out, future)
        try:
            await asyncio.shield(future)
        finally:
            if not future.done():  # the caller gave up; paho still delivers, nobody waits
                self._acks.pop(info.mid, None)

    async def reply(self, message: InboundMessage, payload: Payload, qos: int = 1) -> None:
        """Answer a request on its MQTT 5 response topic, echoing its correlation data. A command
        that named them in its JSON (the 3.1.1 fallback) gets its correlation back in the reply's
        JSON, ``"correlation"``."""
        if not message.response_topic:
            raise ValueError(f"the message on {message.topic} has no response topic to reply to")
        if message.reply_in_body and message.correlation_data is not None and isinstance(payload, Mapping):
            payload = {**payload, "correlation": message.correlation_data.decode("utf-8")}
        await self.publish(message.response_topic, payload, qos=qos, correlation_data=message.correlation_data,
                           content_type="application/json" if isinstance(payload, Mapping) else None)

    async def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Deliver messages matching `topic_filter` to `handler`, in order, from now on and after
        every reconnect. Waits for the broker's SUBACK when connected (raises
        `SubscribeRefusedError` on refusal); otherwise it is sent at the next connect."""
        self._live_client()
        if topic_filter in self._subscriptions:
            raise ValueError(f"already subscribed to {topic_filter}")
        sub = _Subscription(topic_filter, handler, qos, asyncio.Queue(HANDLER_QUEUE_LIMIT))
        sub.task = asyncio.create_task(self._deliver(sub), name=f"mqtt-handler:{topic_filter}")
        self._subscriptions[topic_filter] = sub
        if self.connected:
            future = self._send_subscribe(sub)
            if future is not None:
                await future

    async def unsubscribe(self, topic_filter: str) -> None:
        sub = self._subscriptions.pop(topic_filter, None)
        if sub is None:
            return
        if sub.task is not None:
            sub.task.cancel()
            await asyncio.gather(sub.task, return_exceptions=True)
        if self._client is not None and self.connected:
            self._client.unsubscribe(topic_filter)

    async def publish_state(self) -> None:
        """Publish the retained birth message again (e.g. after the served versions changed)."""
        await self.publish(self.topics.state, self._state_payload(True), retain=True)

    def send_queue(self, name: str) -> SendQueue:
        """A queue for messages that wait in memory for the broker (the caller sends them in
        order), bounded by ``send_queue_max_messages`` and ``send_queue_max_bytes``; its
        figures and drops add up in `status.send`."""
        return SendQueue(self.settings.send_queue_max_messages, self.settings.send_queue_max_bytes, name,
                         self.status.send)

    def add_connect_hook(self, hook: ConnectHook) -> None:
        """Call `hook` after every connect (subscriptions restored, birth sent); also now if connected."""
        self._connect_hooks.append(hook)
        if self.connected:
            self._spawn(self._run_hooks([hook], ConnectInfo(True, self.status.connects)), "mqtt-connect-hook")

    def add_disconnect_hook(self, hook: DisconnectHook) -> None:
        """Call `hook(reason)` after every lost connection."""
        self._disconnect_hooks.append(hook)

    # ---- internals (loop thread) -----------------------------------------------------------

    def _live_client(self) -> paho.Client:
        if self._closed:
            raise LinkClosedError("the MQTT link is stopped")
        if self._client is None:
            raise NotConnectedError("the MQTT link has not been started")
        return self._client

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def _state_payload(self, online: bool, reason: str | None = None) -> bytes:
        body: dict[str, Any] = {
            "schema": STATE_SCHEMA,
            "device_id": self.settings.device_id,
            "group": self.settings.group,
            "online": online,
        }
        if reason != "connection lost":  # the Last Will is fixed at connect time: no timestamp in it
            body["at"] = round(time.time(), 3)
        if reason is not None:
            body["reason"] = reason
        if online:
            body.update(self._state_fields())
        return orjson.dumps(body)

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send_subscribe(self, sub: _Subscription) -> asyncio.Future[None] | None:
        assert self._client is not None
        rc, mid = self._client.subscribe(sub.topic_filter, qos=sub.qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return None  # not connected after all: sent again at the next connect
        future: asyncio.Future[None] = self._running_loop().create_future()
        self._subacks[mid] = (sub.topic_filter, future)
        return future

    async def _deliver(self, sub: _Subscription) -> None:
        while True:
            message = await sub.queue.get()
            try:
                await sub.handler(message)
            except asyncio.CancelledError:
                raise
            except Exception:  # a handler's bug must not stop later messages
                log.exception("mqtt: handler for %s failed on a message on %s", sub.topic_filter, message.topic)

    async def _run_hooks(self, hooks: list[Any], arg: Any) -> None:
        for hook in hooks:
            try:
                await hook(arg)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("mqtt: connection hook %r failed", hook)

    def _on_connected(self, session_present: bool, reason: ReasonCode) -> None:
        if self._closed:
            return
        if reason.is_failure:
            if self._protocol.refused(reason.value):
                self._switch_protocol()
                return
            self.status.last_error = f"broker refused the connection: {reason}"
            log.warning("mqtt: %s", self.status.last_error)
            return
        if self._protocol.connected():
            log.info("mqtt: using MQTT %s%s", self._protocol.name,
                     f" ({self._protocol.why}; see docs/mqtt.md, MQTT 3.1.1 brokers)" if self._protocol.why else "")
        self.status.connects += 1
        self.status.connected = True
        self.status.last_error = None
        self._connected.set()
        log.info("mqtt: connected to %s:%d (session %s, connect #%d)", self.settings.host,
                 self.settings.broker_port, "resumed" if session_present else "new", self.status.connects)
        for sub in self._subscriptions.values():
            future = self._send_subscribe(sub)
            if future is not None:
                future.add_done_callback(_log_subscribe_failure)
        assert self._client is not None
        self._client.publish(self.topics.state, self._state_payload(True), qos=1, retain=True)
        self._spawn(self._run_hooks(list(self._connect_hooks), ConnectInfo(session_present, self.status.connects)),
                    "mqtt-connect-hooks")

    def _on_disconnected(self, reason: str) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self.status.connected = False
        if not self._closed and not was_connected and self._protocol.closed_before_connack():
            self._switch_protocol()
            return
        if self._closed or not was_connected:
            return
        self.status.disconnects += 1
        self.status.last_error = reason
        log.warning("mqtt: connection lost (%s); paho reconnects with backoff", reason)
        self._spawn(self._run_hooks(list(self._disconnect_hooks), reason), "mqtt-disconnect-hooks")

    def _on_connect_failed(self) -> None:
        if not self._closed:
            self.status.last_error = f"cannot reach {self.settings.host}:{self.settings.broker_port}"
            log.debug("mqtt: %s; retrying with backoff", self.status.last_error)

    def _on_published(self, mid: int, reason: ReasonCode) -> None:
        entry = self._acks.pop(mid, None)
        if entry is None:
            return
        out, future = entry
        if future.done():
            return
        if reason.is_failure:  # MQTT 5 only: a 3.1.1 PUBACK carries no reason
            future.set_exception(PublishRefusedError(out.topic, str(reason)))
        else:
            future.set_result(None)

    def _on_subscribed(self, mid: int, reasons: list[ReasonCode]) -> None:
        entry = self._subacks.pop(mid, None)
        if entry is None:
            return
        topic_filter, future = entry
        failed = [r for r in reasons if r.is_failure]
        if future.done():
            return
        if failed:
            future.set_exception(SubscribeRefusedError(topic_filter, str(failed[0])))
        else:
            future.set_result(None)

    def _switch_protocol(self) -> None:
        """Replace the paho client by one for the version `_protocol` now names (before the
        first connect only), handing it what waits for an ack; the old one's thread is
        stopped off the loop."""
        old = self._client
        assert old is not None
        log.debug("mqtt: %s; trying MQTT %s", self._protocol.why, self._protocol.name)
        self.status.protocol = self._protocol.name
        client = self._new_client(self._protocol.version)
        pending, self._acks = list(self._acks.values()), {}
        for out, future in pending:
            if future.done():
                continue
            info = client.publish(out.topic, out.payload, qos=out.qos, retain=out.retain)  # 3.1.1: no properties
            self._acks[info.mid] = (out, future)
        for _, future in self._subacks.values():  # none before a first connect; sent again at it
            if not future.done():
                future.set_result(None)
        self._subacks.clear()
        self._client = client
        client.loop_start()
        self._spawn(asyncio.to_thread(_retire, old), "mqtt-retire-client")

    def _on_message(self, message: InboundMessage) -> None:
        if message.response_topic is None and message.topic == self.topics.cmd:
            fields = reply_fields_from_body(message.payload)
            if fields is not None:
                message = dataclasses.replace(message, response_topic=fields[0], correlation_data=fields[1],
                                              reply_in_body=True)
        for sub in self._subscriptions.values():
            if paho.topic_matches_sub(sub.topic_filter, message.topic):
                try:
                    sub.queue.put_nowait(message)
                except asyncio.QueueFull:
                    self.status.dropped_inbound += 1
                    log.warning("mqtt: handler for %s is %d messages behind; dropped one on %s",
                                sub.topic_filter, HANDLER_QUEUE_LIMIT, message.topic)

    # ---- paho's thread: convert arguments, hand over to the loop, nothing else ----------------

    def _post(self, client: paho.Client, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the agent is gone
            loop.call_soon_threadsafe(self._dispatch, client, callback, *args)

    def _dispatch(self, client: paho.Client, callback: Callable[..., None], *args: Any) -> None:
        """On the loop: run `callback` unless it comes from a client that was replaced."""
        if client is self._client:
            callback(*args)

    def _paho_connect(self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags,
                      reason: ReasonCode, properties: Properties | None) -> None:
        self._post(client, self._on_connected, bool(flags.session_present), reason)

    def _paho_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._post(client, self._on_connect_failed)

    def _paho_disconnect(self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags,
                         reason: ReasonCode, properties: Properties | None) -> None:
        self._post(client, self._on_disconnected, str(reason))

    def _paho_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode,
                      properties: Properties) -> None:
        self._post(client, self._on_published, mid, reason)

    def _paho_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                        properties: Properties | None) -> None:
        self._post(client, self._on_subscribed, mid, list(reasons))

    def _paho_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        props = message.properties
        self._post(client, self._on_message, InboundMessage(
            topic=message.topic,
            payload=bytes(message.payload),
            qos=message.qos,
            retain=bool(message.retain),
            response_topic=getattr(props, "ResponseTopic", None),
            correlation_data=getattr(props, "CorrelationData", None),
            content_type=getattr(props, "ContentType", None),
            user_properties=tuple(getattr(props, "UserProperty", ()) or ()),
        ))


def _publish_properties(response_topic: str | None, correlation_data: bytes | None, content_type: str | None,
                        message_expiry_s: int | None, user_properties: Mapping[str, str] | None
                        ) -> Properties | None:
    if not any(v is not None for v in (response_topic, correlation_data, content_type, message_expiry_s,
                                        user_properties)):
        return None
    props = Properties(PacketTypes.PUBLISH)
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation_data is not None:
        props.CorrelationData = correlation_data
    if content_type is not None:
        props.ContentType = content_type
    if message_expiry_s is not None:
        props.MessageExpiryInterval = message_expiry_s
    if user_properties:
        props.UserProperty = list(user_properties.items())
    return props


def _retire(client: paho.Client) -> None:
    """Stop a replaced client: no reconnects, its thread ended (blocking: run off the loop)."""
    client.disconnect()
    client.loop_stop()


def _log_subscribe_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("mqtt: %s", future.exception())
