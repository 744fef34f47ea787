"""The fleet view's MQTT subscriber: every topic the page reads, handed to the event loop.

paho's network thread does nothing but `call_soon_threadsafe` (as the rollout
controller does); the `on_message` / `on_connection` callbacks run on the loop.
Reconnects are paho's (1 s doubling to 30 s); a lost broker is reported as such,
and the page shows it, until it is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

from ..mqtt_tools import Broker, broker_protocol


def topic_filters(prefix: str) -> list[str]:
    """What the page is built from: retained state, reported, update; telemetry; firing
    alerts; the hub's rollouts."""
    return [f"{prefix}/devices/+/{kind}" for kind in ("state", "reported", "update", "telemetry")] + [
        f"{prefix}/devices/+/alerts/+", f"{prefix}/rollouts/+"]


class MqttSource:
    def __init__(self, broker: Broker, prefix: str, on_message: Callable[[str, bytes, float], None],
                 on_connection: Callable[[bool, str | None], None], keepalive_s: int = 15) -> None:
        self.broker, self.prefix = broker, prefix
        self._on_message, self._on_connection = on_message, on_connection
        self._keepalive_s = keepalive_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client = self.broker.client(broker_protocol(self.broker), f"edgefleet-hub-view-{id(self):x}")
        self._client.reconnect_delay_set(1, 30)
        self._client.on_connect = self._connected
        self._client.on_disconnect = self._disconnected
        self._client.on_message = self._message
        self._client.on_connect_fail = lambda client, userdata: self._call(self._on_connection, False,
                                                                           "cannot connect")

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._client.connect_async(self.broker.host, self.broker.port, keepalive=self._keepalive_s)
        self._client.loop_start()

    async def stop(self) -> None:
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        self._loop = None

    # paho's thread: hand over, nothing else

    def _connected(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._call(self._on_connection, False, f"refused: {reason}")
            return
        for topic in topic_filters(self.prefix):
            client.subscribe(topic, qos=1)
        self._call(self._on_connection, True, None)

    def _disconnected(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._call(self._on_connection, False, str(reason))

    def _message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._call(self._on_message, msg.topic, bytes(msg.payload), time.time())

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)
