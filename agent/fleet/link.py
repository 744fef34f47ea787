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
from typing import Any

from aiohttp import web

from agent import __version__
from agent.context import CONFIG, MODELS, MQTT
from runtime.registry import RegistryEvent, RegistryEventKind
from sync.errors import SyncError
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
    """The birth message's fields beyond online/device/group: who we are and what we serve."""
    models = app.get(MODELS)
    return {
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
    try:
        yield
    finally:
        await republish.close()
        await link.stop()


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
