"""The rollout controller: `edgefleet hub control`, a long-running process beside the hub.

It subscribes to every device's retained ``state``, ``reported`` and ``update``
topics, keeps the fleet view in memory (sync/hub/fleet.py), and evaluates
each running rollout every `interval_s` and shortly after messages arrive. When a
step is done it signs the next one (or completes, or aborts) through
sync/hub/rollouts/actions.py and rings the group's doorbell. What it knows of a
rollout lives in the rollout's record, so a restarted controller (or machine)
picks up where it was: the fleet view is rebuilt from the retained messages at
connect. Each rollout's status is published, retained, on ``{prefix}/rollouts/{id}``
whenever it changes, and all of them again after every connect
(sync/hub/rollouts/topic.py), for the fleet view page and the webhooks.

paho's network thread only hands messages to the asyncio loop
(`call_soon_threadsafe`); file work and signing run in a worker thread
(`asyncio.to_thread`), one evaluation at a time. A message it cannot read is
counted (`FleetView.ignored`, written with the controller's counters to
``<hub>/rollouts/controller.json`` and logged), never fatal. SIGTERM / SIGINT
end it cleanly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho

from ..errors import HubError, HubUnreachable
from .fleet import DeviceView, FleetView
from .mqtt_tools import Broker, broker_protocol, refusal_cause
from .publish import PublishResult
from .repository import HubRepository
from .rollouts import actions
from .rollouts.store import RolloutStore
from .rollouts.topic import RolloutPublisher, rollout_message, rollout_topic
from .run import run_until_signalled

log = logging.getLogger("edgefleet.hub.controller")
#: after a message, evaluate this soon (a burst of messages shares one evaluation)
SETTLE_S = 0.3
#: after a (re)connect, decide nothing until the retained messages have had this long to arrive:
#: a partial fleet view could advance a step past devices it has not heard from yet
CONNECT_GRACE_S = 2.0


@dataclass
class Controller:
    repo: HubRepository
    broker: Broker
    prefix: str = "edgefleet/v1"
    interval_s: float = 2.0
    clock: Callable[[], float] = time.time
    fleet: FleetView = field(init=False)
    store: RolloutStore = field(init=False)
    connected: bool = False
    errors: int = 0

    def __post_init__(self) -> None:
        self.fleet = FleetView(self.prefix)
        self.store = RolloutStore(self.repo.dir)
        self._client = self.broker.client(broker_protocol(self.broker), f"edgefleet-hub-controller-{id(self):x}")
        self._client.reconnect_delay_set(1, 30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dirty = asyncio.Event()
        self._written: dict[str, Any] | None = None
        self._logged_ignored = 0
        self._connected_at = 0.0
        self._presence: dict[str, Any] | None = None
        self._rollouts = RolloutPublisher()
        #: set at every connect, read by the worker thread: publish every rollout again
        self._republish = True

    # ---- paho's thread: hand over, nothing else -------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            return
        for kind in ("state", "reported", "update"):
            client.subscribe(f"{self.prefix}/devices/+/{kind}", qos=1)
        self._call(self._connected, True)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._call(self._connected, False)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._call(self._ingest, msg.topic, bytes(msg.payload), self.clock())

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    # ---- the loop ---------------------------------------------------------------------------

    def _connected(self, up: bool) -> None:
        if up and not self.connected:
            self._connected_at = time.monotonic()
            self._republish = True
        if up != self.connected:
            log.info("MQTT broker %s:%d %s", self.broker.host, self.broker.port, "connected" if up else "lost")
        self.connected = up

    def _ingest(self, topic: str, payload: bytes, received_at: float) -> None:
        if not self.fleet.ingest(topic, payload, received_at):
            total = sum(self.fleet.ignored.values())
            if total >= 2 * self._logged_ignored or total - self._logged_ignored >= 100:
                log.warning("ignored %d message(s) so far: %s (last on %s)", total, dict(self.fleet.ignored), topic)
                self._logged_ignored = total
        self._dirty.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set: connected (reconnecting as needed), evaluating."""
        self._loop = asyncio.get_running_loop()
        self._client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self._client.loop_start()
        log.info("rollout controller for %s on %s:%d", self.repo.dir, self.broker.host, self.broker.port)
        try:
            while not stop.is_set():
                waiter = asyncio.ensure_future(self._dirty.wait())
                stopper = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait({waiter, stopper}, timeout=self.interval_s,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    stopper.cancel()
                if stop.is_set():
                    break
                if self._dirty.is_set():
                    await asyncio.sleep(SETTLE_S)  # let a burst land
                    self._dirty.clear()
                await self.tick()
        finally:
            self._client.disconnect()
            await asyncio.to_thread(self._client.loop_stop)
            self._loop = None

    async def tick(self) -> None:
        """Evaluate every running rollout once (in a worker thread), then ring doorbells."""
        # the thread gets copies: the loop goes on taking messages meanwhile
        snapshot = {d: dataclasses.replace(v) for d, v in self.fleet.devices.items()}
        counters = {"connected": self.connected, "devices": len(self.fleet.devices), "received": self.fleet.received,
                    "ignored": dict(self.fleet.ignored), "errors": self.errors,
                    "broker": f"{self.broker.host}:{self.broker.port}"}
        presence = {d: {"online": v.online, "since": v.online_since if v.online else v.offline_since}
                    for d, v in self.fleet.devices.items() if v.online is not None}
        try:
            results = await asyncio.to_thread(self._evaluate, snapshot, counters, presence)
        except Exception:  # a bad record or a signing error must not end the controller
            self.errors += 1
            log.exception("rollout evaluation failed; trying again in %gs", self.interval_s)
            return
        for result in results:
            await asyncio.to_thread(self._ring, result)

    def _evaluate(self, devices: dict[str, DeviceView], counters: dict[str, Any],
                  presence: dict[str, Any]) -> list[PublishResult]:
        results = []
        now = self.clock()
        if self.connected and time.monotonic() - self._connected_at >= CONNECT_GRACE_S:
            # without MQTT (or just after a connect) the fleet view is stale or partial: decide nothing
            for record in self.store.active():
                try:
                    _, decision, result = actions.step(self.repo, self.store, record.id, devices, now)
                except HubError as exc:
                    self.errors += 1
                    log.error("rollout %s: %s", record.id, exc)
                    continue
                if decision is not None and decision.action != "wait":
                    log.info("rollout %s: %s (%s)", record.id, decision.action, decision.reason)
                if result is not None:
                    results.append(result)
        if counters != self._written:
            self._written = counters
            self.store.save_controller(counters | {"at": now})
        if presence != self._presence:
            self._presence = presence
            self.store.save_presence(presence)
        self._publish_rollouts()
        return results

    def _publish_rollouts(self) -> None:
        """Every rollout whose status changed (by this controller or by the CLI), retained on
        ``{prefix}/rollouts/{id}`` (sync/hub/rollouts/topic.py); all of them after a connect."""
        if not self.connected:
            return
        if self._republish:
            self._republish = False
            self._rollouts.forget()
        for rollout_id, body in self._rollouts.changed(self.store.all()):
            info = self._client.publish(rollout_topic(self.prefix, rollout_id), rollout_message(body, self.clock()),
                                        qos=1, retain=True)
            if info.rc == paho.MQTT_ERR_SUCCESS:
                self._rollouts.sent(rollout_id, body)

    def _ring(self, result: PublishResult) -> None:
        topic = result.doorbell_topic(self.prefix)
        info = self._client.publish(topic, result.doorbell, qos=1, retain=True)
        try:
            info.wait_for_publish(10)
        except (RuntimeError, ValueError) as exc:
            log.warning("doorbell on %s not sent (%s); devices find the step at their next check", topic, exc)
            return
        if not info.is_published():
            log.warning("doorbell on %s not acknowledged within 10s; devices find the step at their next check",
                        topic)
            return
        log.info("doorbell rung on %s (serial %d)", topic, result.serial)


def run_controller(repo: HubRepository, broker: Broker, prefix: str, interval_s: float) -> None:
    """`edgefleet hub control`: run until SIGTERM or SIGINT."""
    repo.settings  # noqa: B018 - refuses a directory that is not a hub

    async def main(stop: asyncio.Event) -> None:
        await Controller(repo, broker, prefix, interval_s).run(stop)
        log.info("rollout controller stopped")

    run_until_signalled(main)


def collect_fleet(broker: Broker, prefix: str, wait_s: float, clock: Callable[[], float] = time.time) -> FleetView:
    """The fleet view from the retained state, reported and update messages that arrive
    within `wait_s` (what `hub status` shows)."""
    import threading

    fleet = FleetView(prefix)
    lock = threading.Lock()
    client = broker.client(broker_protocol(broker))

    def on_connect(client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        for kind in ("state", "reported", "update"):
            client.subscribe(f"{prefix}/devices/+/{kind}", qos=1)

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with lock:
            fleet.ingest(msg.topic, bytes(msg.payload), clock())

    answers: list[Any] = []

    def connected(client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        answers.append(reason)
        on_connect(client, userdata, flags, reason, props)

    client.on_connect = connected
    client.on_message = on_message
    try:
        client.connect(broker.host, broker.port)
    except OSError as exc:
        raise HubUnreachable(f"MQTT broker {broker.host}:{broker.port}: {exc}") from None
    client.loop_start()
    try:
        time.sleep(wait_s)
    finally:
        client.disconnect()
        client.loop_stop()
    if not answers or answers[0].is_failure:  # refused, or closed (a TLS broker refusing our certificate)
        raise HubUnreachable(f"MQTT broker {broker.host}:{broker.port} refused the connection: "
                             f"{answers[0] if answers else refusal_cause(broker)}")
    with lock:
        return fleet
