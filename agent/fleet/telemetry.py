"""Telemetry and energy saving as one cleanup context.

Starts the runtime's `Sampler` (energy every `telemetry.energy_sample_s`, system
figures every `telemetry.interval_s`) and registers its figures with /metrics;
runs the idle-unload check for models with a keep-alive; and, when the MQTT link
is up, the store-and-forward `TelemetryPublisher` with its outbox in
``<state_dir>/outbox``. Stops in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agent import __version__
from agent.context import CONFIG, LIVE, METRICS, MODELS, MQTT
from agent.fleet.link import boot_id
from runtime.energy.meter import default_meter
from runtime.energy.sampler import Sampler
from runtime.system import SystemMonitor

if TYPE_CHECKING:  # the publisher and its outbox (sqlite3) are imported once the MQTT link is there
    from sync.telemetry import OutboxStats, StorageHealth, TelemetryPublisher

log = logging.getLogger(__name__)

SAMPLER = web.AppKey("sampler", Sampler)
PUBLISHER: web.AppKey[TelemetryPublisher] = web.AppKey("telemetry_publisher")


async def telemetry_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    settings = config.telemetry
    models = app[MODELS]
    idle = asyncio.create_task(_unload_idle(app), name="idle-unload")
    if not settings.enabled:
        try:
            yield
        finally:
            await _cancel(idle)
        return
    # the registry's counters start with this app: a new run id and start time say so
    run_id, started = str(uuid.uuid4()), time.time()
    meter = await asyncio.to_thread(
        default_meter,
        {"idle_w_per_cpu": settings.estimate_idle_w_per_cpu, "max_w_per_cpu": settings.estimate_max_w_per_cpu},
        settings.max_plausible_w)
    state_dir = config.state_dir if Path(config.state_dir).is_dir() else "/"
    sampler = Sampler(models, meter, SystemMonitor(state_dir), settings.energy_sample_s, settings.interval_s)
    await sampler.start()
    app[SAMPLER] = sampler
    publisher: TelemetryPublisher | None = None
    link = app.get(MQTT)
    if link is not None:
        from sync.telemetry import Outbox, RecordHeader, TelemetryPublisher, build_record

        # opened on first use: a full disk at start-up is reported by the publisher, never fatal
        outbox = Outbox(Path(config.state_dir) / "outbox", settings.outbox_max_records)
        header = RecordHeader(config.mqtt.device_id, config.mqtt.group, __version__, boot_id(), run_id,
                              started, settings.interval_s)

        def build(seq: int, stats: OutboxStats, published: int, storage: StorageHealth) -> dict[str, Any]:
            return build_record(seq, header, time.time(), models, sampler.system, sampler.energy,
                                sampler.attributed(), stats, link.status, published, storage)

        publisher = TelemetryPublisher(link, outbox, build, settings.interval_s)
        await publisher.start()
        app[PUBLISHER] = publisher
    app[METRICS].watch_telemetry(sampler, lambda: publisher, lambda: link.status if link else None)
    try:
        yield
    finally:
        await _cancel(idle)
        if publisher is not None:
            await publisher.stop()
        await sampler.stop()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _unload_idle(app: web.Application) -> None:
    """Unload models idle past their keep-alive (runtime/registry.py `unload_idle`)."""
    models = app[MODELS]
    while True:
        keep = {m.name: m.keep_alive_s for m in app[LIVE].config.models if m.keep_alive_s > 0}
        models.keep_alive_s = keep
        asked = [s for s in models.keep_alive_requested.values() if s > 0]  # requests' keep_alive
        await asyncio.sleep(min(30.0, max(0.25, min([*keep.values(), *asked], default=120.0) / 4)))
        try:
            await models.unload_idle()
        except Exception:  # one failed unload must not end energy saving
            log.exception("idle unload failed")
