"""Signed updates wired into the app: recovery before the models load, the update service
after the MQTT link, and the operator's rollback endpoint.

Off unless ``[updates] hub_url`` is set. When on:

- `recovery_ctx` (before the registry's context) repairs the store after a crash
  and puts `current` back on the confirmed version of any model whose
  activation was interrupted, so the models load from a verified version;
- every model the store holds is served, configured or not (a desired state
  may bring a new model name);
- `updates_ctx` (after the MQTT link's context) starts `sync.updates.UpdateService`
  once the configured models are loaded, and stops it first at shutdown;
- ``POST /v2/repository/models/{name}/rollback`` (KServe's repository extension
  family; API key as for load/unload) serves the previous version again; it is
  what `edgefleet models rollback NAME` calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from agent.config import AgentConfig, ModelEntry
from agent.context import CONFIG, LOADER, MODELS, MQTT
from agent.http.errors import ApiError
from agent.http.jsonio import json_response
from runtime.errors import RuntimeLayerError
from runtime.store import ModelStore
from security.errors import SecurityError
from sync.errors import SyncError
from sync.mqtt import Topics
from sync.tuf_client import HubClient
from sync.updates import UpdateService, recover_after_crash

log = logging.getLogger(__name__)

UPDATES = web.AppKey("updates", UpdateService)
STORE = web.AppKey("store", ModelStore)


def with_managed_models(config: AgentConfig) -> AgentConfig:
    """With updates on, every model in the store serves, listed in the config or not."""
    if not config.updates.enabled:
        return config
    listed = {m.name for m in config.models}
    extra = [ModelEntry(name=n) for n in ModelStore(config.state_dir).names() if n not in listed]
    return config.with_overrides(models=[*config.models, *extra]) if extra else config


def build_service(config: AgentConfig, store: ModelStore, app: web.Application) -> UpdateService:
    settings = config.updates
    assert settings.hub_url is not None
    try:
        trust_root = Path(settings.trust_root).read_bytes()
    except OSError as exc:
        raise SecurityError(f"updates.trust_root {settings.trust_root}: cannot read it ({exc.strerror})") from None
    mqtt = config.mqtt
    hub = HubClient(Path(config.state_dir) / "tuf", settings.hub_url, trust_root, mqtt.group, mqtt.device_id,
                    timeout_s=int(settings.read_timeout_s))
    topics = Topics(mqtt.topic_prefix, mqtt.group, mqtt.device_id)
    return UpdateService(settings, store, app[MODELS], hub, topics, Path(config.state_dir), link=app.get(MQTT))


async def recovery_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    if config.updates.enabled:
        store = ModelStore(config.state_dir)
        store.ensure_layout()
        app[STORE] = store
        for note in recover_after_crash(store, Path(config.state_dir)):  # before the registry reads `current`
            log.warning("updates: %s", note)
    yield


async def updates_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    if not config.updates.enabled:
        yield
        return
    try:
        service = build_service(config, app[STORE], app)
    except (SecurityError, SyncError) as exc:
        log.error("updates: not started: %s", exc)
        yield
        return
    app[UPDATES] = service

    async def start_when_loaded() -> None:
        await asyncio.shield(app[LOADER])
        await service.start()

    starter = asyncio.create_task(start_when_loaded(), name="updates-start")
    try:
        yield
    finally:
        starter.cancel()
        await asyncio.gather(starter, return_exceptions=True)
        await service.stop()


async def rollback_handler(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    service = request.app.get(UPDATES)
    if service is None:
        raise ApiError(409, "Signed updates are off on this agent ([updates] hub_url is unset); "
                       "nothing was installed that could be rolled back", code="updates_off")
    try:
        version = await service.rollback(name, reason="rolled back by the operator")
    except (RuntimeLayerError, SyncError) as exc:
        raise ApiError(409, f"Cannot roll {name} back: {exc}", code="no_previous_version") from None
    return json_response({"name": name, "version": version, "state": "rolled-back"})


def setup(app: web.Application) -> None:
    app.router.add_post("/v2/repository/models/{name}/rollback", rollback_handler)


def offline_rollback(config: AgentConfig, name: str) -> str:
    """`models rollback` while no agent runs: switch `current` back on disk and deny the
    version rolled back from (the next start serves the previous version)."""
    from sync.journal import Journal
    from sync.updates import journal_path

    store = ModelStore(config.state_dir)
    current = store.current(name)
    target = store.roll_back(name, reason="rolled back by the operator (agent not running)")
    if current is not None:
        journal = Journal(journal_path(Path(config.state_dir)))
        journal.deny(name, current, "operator", "rolled back by the operator")
        with contextlib.suppress(OSError):
            journal.save()
    return target
