"""`edgefleet hub view`: the fleet page, live, read-only, from what the broker carries.

One aiohttp app (`make_app`). The MQTT subscriber (source.py) feeds the hub-side fleet
model (sync/hub/fleet.py); every change marks a device or rollout dirty, and a
flusher sends what changed to every open page as one server-sent event at most
every `FLUSH_S` (coalesced: 300 devices reporting every few seconds give a few
events a second, not hundreds). A page that reads too slowly is dropped; its
EventSource reconnects and starts again from a snapshot. Telemetry points and
update job transitions go to the bounded SQLite history (history.py) in batches,
on one worker thread.

Routes: ``/`` (the fleet), ``/devices/{id}`` (one device: charts and job history),
``/api/fleet`` (the snapshot as JSON), ``/api/devices/{id}`` (history),
``/api/events`` (the live events), ``/static/…``. Nothing here changes anything:
there is no operator authentication on this side, so pause / resume / abort stay
with `edgefleet hub rollout` (the page says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiohttp_sse import sse_response

from ...errors import SyncError
from ..fleet import FleetView
from ..mqtt_tools import Broker
from . import rows
from .history import History, Limits
from .source import MqttSource

log = logging.getLogger("edgefleet.hub.view")
STATIC = Path(__file__).parent / "static"
#: at most one live event per this many seconds
FLUSH_S = 0.25
#: history writes are batched this long
HISTORY_FLUSH_S = 1.0
PRUNE_EVERY_S = 60.0
#: events queued for one page before it counts as too slow and is dropped
QUEUE_MAX = 64
#: a stream with nothing to send checks this often whether its page has gone (aiohttp does not
#: cancel a handler whose client left)
IDLE_CHECK_S = 2.0


@dataclass
class ViewSettings:
    broker: Broker
    prefix: str = "edgefleet/v1"
    history: Path | None = None
    limits: Limits = field(default_factory=Limits)
    keepalive_s: int = 15


class FleetPage:
    """The live state behind the page: the fleet model, the broker's state, the open pages."""

    def __init__(self, settings: ViewSettings) -> None:
        self.settings = settings
        self.fleet = FleetView(settings.prefix)
        self.connected = False
        self.connection_since = time.time()
        self.connection_error: str | None = None
        self.subscribers: set[asyncio.Queue[str | None]] = set()
        self.dirty_devices: set[str] = set()
        self.dirty_rollouts: set[str] = set()
        self.dirty_meta = True
        self.pending_points: list[tuple[str, str, float, float]] = []
        self.pending_events: list[tuple[str, float, dict[str, Any]]] = []
        self.events_sent = 0
        self.dropped_pages = 0
        self._wake = asyncio.Event()
        self.history = History(settings.history, settings.limits)
        self.db = ThreadPoolExecutor(1, thread_name_prefix="fleet-view-history")

    # ---- fed by the MQTT subscriber (on the loop) ----------------------------------------------

    def on_message(self, topic: str, payload: bytes, received_at: float) -> None:
        known_rollouts = set(self.fleet.rollouts)
        if not self.fleet.ingest(topic, payload, received_at):
            self.dirty_meta = True
        else:
            kind, _, name = topic.removeprefix(f"{self.fleet.prefix}/").partition("/")
            if kind == "rollouts":
                self.dirty_rollouts.add(name)
            else:
                device = name.partition("/")[0]
                self.dirty_devices.add(device)
                view = self.fleet.devices.get(device)
                if view is not None and topic.endswith("/telemetry") and payload:
                    self.pending_points.extend(rows.points(view, received_at))
                elif view is not None and topic.endswith("/update") and payload:
                    event = rows.job_event(view)
                    if event is not None:
                        self.pending_events.append((device, received_at, event))
            if set(self.fleet.rollouts) != known_rollouts:
                self.dirty_meta = True
        self._wake.set()

    def on_connection(self, up: bool, error: str | None) -> None:
        if up != self.connected:
            self.connection_since = time.time()
            log.info("MQTT broker %s:%d %s", self.settings.broker.host, self.settings.broker.port,
                     "connected" if up else f"lost ({error})")
        self.connected = up
        self.connection_error = None if up else error
        self.dirty_meta = True
        self._wake.set()

    # ---- what the page gets -------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        broker = self.settings.broker
        return {"broker": {"address": f"{broker.host}:{broker.port}", "connected": self.connected,
                           "since": self.connection_since, "error": self.connection_error},
                "ignored": dict(self.fleet.ignored), "ignored_total": sum(self.fleet.ignored.values()),
                "last_ignored_topic": self.fleet.last_ignored_topic, "received": self.fleet.received,
                "now": time.time()}

    def device_rows(self, device_ids: list[str]) -> list[dict[str, Any]]:
        status = rows.flags_of(self.fleet, device_ids, time.time())
        return [rows.device_row(self.fleet.devices[d], status[d]) for d in device_ids
                if d in self.fleet.devices and d in status]

    def snapshot(self) -> dict[str, Any]:
        return {"meta": self.meta(), "devices": self.device_rows(sorted(self.fleet.devices)),
                "rollouts": [rows.rollout_row(b) for _, b in sorted(self.fleet.rollouts.items())],
                "rollout_ids": sorted(self.fleet.rollouts)}

    def _changes(self) -> dict[str, Any] | None:
        if not (self.dirty_devices or self.dirty_rollouts or self.dirty_meta):
            return None
        devices, self.dirty_devices = sorted(self.dirty_devices), set()
        rollouts, self.dirty_rollouts = sorted(self.dirty_rollouts), set()
        self.dirty_meta = False
        return {"meta": self.meta(), "devices": self.device_rows(devices),
                "rollouts": [rows.rollout_row(self.fleet.rollouts[r]) for r in rollouts if r in self.fleet.rollouts],
                "rollout_ids": sorted(self.fleet.rollouts)}

    def publish(self, event: str) -> None:
        for queue in list(self.subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # too slow: drop it; its EventSource comes back for a snapshot
                self.subscribers.discard(queue)
                self.dropped_pages += 1
                with contextlib.suppress(asyncio.QueueFull):
                    queue.get_nowait()
                    queue.put_nowait(None)

    async def flusher(self) -> None:
        """Coalesce: one event with everything that changed, at most every FLUSH_S."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            changes = self._changes()
            if changes is not None and self.subscribers:
                self.publish(orjson.dumps(changes).decode())
                self.events_sent += 1
            await asyncio.sleep(FLUSH_S)

    async def history_writer(self) -> None:
        loop = asyncio.get_running_loop()
        last_prune = time.monotonic()
        while True:
            await asyncio.sleep(HISTORY_FLUSH_S)
            points, self.pending_points = self.pending_points, []
            events, self.pending_events = self.pending_events, []
            if points or events:
                await loop.run_in_executor(self.db, self.history.add, points, events)
            if time.monotonic() - last_prune >= PRUNE_EVERY_S:
                last_prune = time.monotonic()
                await loop.run_in_executor(self.db, self.history.prune)

    async def device_history(self, device: str) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        series = await loop.run_in_executor(self.db, self.history.series, device)
        events = await loop.run_in_executor(self.db, self.history.events, device)
        return {"series": series, "jobs": events}


PAGE = web.AppKey("page", FleetPage)


def make_app(settings: ViewSettings) -> web.Application:
    app = web.Application()

    async def running(app: web.Application) -> AsyncIterator[None]:
        page = FleetPage(settings)
        app[PAGE] = page
        source = MqttSource(settings.broker, settings.prefix, page.on_message, page.on_connection,
                            settings.keepalive_s)
        source.start()
        tasks = [asyncio.create_task(page.flusher(), name="fleet-view-flusher"),
                 asyncio.create_task(page.history_writer(), name="fleet-view-history")]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for queue in list(page.subscribers):
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(None)
            await source.stop()
            page.db.submit(page.history.close).result()
            page.db.shutdown()

    async def closing(app: web.Application) -> None:
        """Before aiohttp waits for the handlers: end every live stream."""
        page = app[PAGE]
        for queue in list(page.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)

    app.cleanup_ctx.append(running)
    app.on_shutdown.append(closing)
    app.router.add_get("/", _index)
    app.router.add_get("/devices/{device}", _index)
    app.router.add_get("/api/fleet", _fleet)
    app.router.add_get("/api/devices/{device}", _device)
    app.router.add_get("/api/events", _events)
    app.router.add_static("/static/", STATIC)
    app.router.add_get("/favicon.ico", lambda request: _no_content())
    return app


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={
        "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:",
        "Cache-Control": "no-cache"})


async def _no_content() -> web.Response:
    return web.Response(status=204)


async def _fleet(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(request.app[PAGE].snapshot()), content_type="application/json")


async def _device(request: web.Request) -> web.Response:
    page = request.app[PAGE]
    device = request.match_info["device"]
    if device not in page.fleet.devices:
        return web.json_response({"error": {"message": f"no device {device!r} has reported",
                                            "type": "not_found"}}, status=404)
    body = {"device": page.device_rows([device])[0]} | await page.device_history(device)
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def _events(request: web.Request) -> web.StreamResponse:
    page = request.app[PAGE]
    queue: asyncio.Queue[str | None] = asyncio.Queue(QUEUE_MAX)
    async with sse_response(request, send_timeout=10, headers={"X-Accel-Buffering": "no"}) as sse:
        page.subscribers.add(queue)
        try:
            await sse.send(orjson.dumps(page.snapshot()).decode(), event="snapshot")
            while sse.is_connected():
                try:
                    data = await asyncio.wait_for(queue.get(), timeout=IDLE_CHECK_S)
                except TimeoutError:  # nothing to send: is the page still there?
                    if request.transport is None or request.transport.is_closing():
                        break
                    continue
                if data is None:
                    break
                await sse.send(data, event="update")
        except (ConnectionResetError, TimeoutError):
            pass
        finally:
            page.subscribers.discard(queue)
    return sse


def serve_view(settings: ViewSettings, host: str, port: int, announce: str | None = None) -> None:
    """Run until SIGINT / SIGTERM; an OSError from the bind propagates (the CLI words it)."""
    from agent.lifecycle.logs import setup_logging

    setup_logging("info")
    if settings.history is not None:
        try:
            settings.history.parent.mkdir(parents=True, exist_ok=True)
            History(settings.history).close()  # a history file that cannot be opened: say so now
        except (OSError, sqlite3.Error) as exc:
            raise SyncError(f"cannot open the history {settings.history}: {exc}") from None
    web.run_app(make_app(settings), host=host, port=port, print=(lambda _: print(announce, flush=True))
                if announce else None, access_log=None)
