"""The MQTT link as one of the app's cleanup contexts, and what its birth message says.

Off unless ``[mqtt] host`` is set. When on, the link starts with the app (it
connects in the background: the agent serves even while the broker is away)
and stops before the models unload, saying ``offline`` (``shutdown``) on the way
out. Consumers (telemetry, signed updates) find it under ``app[MQTT]``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agent import __version__
from agent.context import CONFIG, MODELS, MQTT
from runtime.registry import RegistryEvent, RegistryEventKind
from sync.errors import SyncError

if TYPE_CHECKING:  # the link's module imports paho: only an agent with [mqtt] loads it
    from sync.mqtt import MqttLink

log = logging.getLogger(__name__)

#: The kernel's id for this boot (changes at every reboot); a random one where there is none.
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    try:
        return BOOT_ID_PATH.read_text(encoding="ascii").strip()
    except OSError:
        return str(uuid.uuid4())


PROCESS_STARTED_AT = time.time()


def state_fields(app: web.Application) -> dict[str, Any]:
    """The birth message's fields beyond online/device/group: who we are and what we serve, and
    the public half of the device key that signs the audit log's checkpoints (``device_key``)."""
    from agent.fleet.audit import device_key_field

    models = app.get(MODELS)
    return {
        **device_key_field(app),
        "agent_version": __version__,
        "boot_id": boot_id(),
        "started_at": round(PROCESS_STARTED_AT, 3),
        "models": {s.name: {"version": s.version, "state": s.state.value}
                   for s in (models.statuses() if models is not None else [])},
    }


async def mqtt_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[CONFIG].mqtt
    if not settings.enabled:
        yield
        return
    from sync.mqtt import MqttLink  # paho: loaded only by an agent with [mqtt]

    link = MqttLink(settings, state_fields=lambda: state_fields(app))
    try:
        await link.start()
    except ValueError as exc:  # an unreadable CA, certificate or password file
        log.error("mqtt: not started: %s", exc)
        yield
        return
    app[MQTT] = link
    republish = Republisher(link, link.publish_state, "state")
    if MODELS in app:
        app[MODELS].subscribe(republish.on_event)
    watch = (asyncio.create_task(watch_certificate(link), name="mqtt-certificate-watch")
             if settings.tls and settings.cert_file else None)
    try:
        yield
    finally:
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        await republish.close()
        await link.stop()


#: while not connected to a TLS broker with a client certificate: ask the handshake why after
#: this long, then again this often (a line is logged when the answer changes)
CERT_PROBE_AFTER_S = 3.0
CERT_PROBE_EVERY_S = 30.0


async def watch_certificate(link: MqttLink) -> None:
    """Say why a TLS broker will not take this device: paho only sees the connection close.
    A certificate that expired (or is not valid yet) is named at once, from its own dates; a
    revoked one (or another refusal) from the broker's TLS alert (security/tls_probe.py). The
    agent goes on serving locally either way; the reason is also `link.status.last_error`."""
    from security.tls import client_context
    from security.tls_probe import certificate_dates, handshake_outcome

    s = link.settings
    assert s.cert_file is not None
    try:
        dates = certificate_dates(s.cert_file)
        expired = dates.problem()
    except ValueError as exc:
        dates, expired = None, str(exc)
    if expired is not None:
        subject = f" (CN={dates.subject})" if dates is not None else ""
        link.status.last_error = f"TLS client certificate {s.cert_file}{subject} {expired}"
        log.error("mqtt: the client certificate %s%s %s: the broker will refuse it; the agent serves locally "
                  "until it is renewed (mqtt.cert_file)", s.cert_file, subject, expired)
    said: str | None = None
    await asyncio.sleep(CERT_PROBE_AFTER_S)
    while True:
        if not link.connected:
            try:
                context = client_context(s.ca_file, s.cert_file, s.key_file)
                cause = await asyncio.to_thread(handshake_outcome, s.host or "", s.broker_port, context)
            except (OSError, ValueError):  # unreachable, or unreadable files: the link says so itself
                cause = None
            if cause is not None and cause != said:
                link.status.last_error = f"TLS: {cause}"
                log.error("mqtt: the broker %s:%d refuses this device's TLS client certificate %s: %s; the agent "
                          "serves locally and keeps trying", s.host, s.broker_port, s.cert_file, cause)
            said = cause
        await asyncio.sleep(CERT_PROBE_EVERY_S)


class Republisher:
    """Publishes a retained message again when what it says changes, a burst at a time.

    A change that arrives while a publish is under way (its state already read) gets a
    publish of its own after it: otherwise a model that turns ready during the publish of
    its "loading" would be announced as loading until the next change. While the broker
    is away nothing is sent; whoever owns the message publishes it again after the
    connect (the birth does; the reported state registers a connect hook)."""

    def __init__(self, link: MqttLink, publish: Callable[[], Awaitable[None]], what: str) -> None:
        self._link = link
        self._publish_now = publish
        self._what = what
        self._task: asyncio.Task[None] | None = None
        self._dirty = False

    def on_event(self, event: RegistryEvent) -> None:
        if event.kind is RegistryEventKind.STATUS:
            self.soon()

    def soon(self) -> None:
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._publish(), name=f"mqtt-{self._what}-republish")

    async def _publish(self) -> None:
        while self._dirty:
            await asyncio.sleep(0.2)  # one message for a burst of changes (a swap is several)
            self._dirty = False  # changes from here on are not in this publish's state
            if self._link.connected:
                try:
                    await self._publish_now()
                except SyncError as exc:
                    log.warning("mqtt: %s not republished: %s", self._what, exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
