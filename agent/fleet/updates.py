"""Signed updates wired into the app: recovery before the models load, the update service
after the MQTT link, and the operator's rollback endpoint.

Off unless ``[updates] hub_url`` is set. When on:

- `recovery_ctx` (before the registry's context) repairs the store after a crash
  and puts `current` back on the confirmed version of any model whose
  activation was interrupted, so the models load from a verified version;
- what serves is ``[[models]]`` plus the names the hub's last accepted desired
  state lists (`with_managed_models`; a desired state may bring a new name); a
  name neither lists stops serving at a reload, or when the hub drops it;
- `updates_ctx` (after the MQTT link's context) starts `sync.updates.UpdateService`
  once the configured models are loaded and, under `edgefleet serve`, have answered
  the start-up check (an update landing during that check once swapped a version
  out from under it, which then logged an ERROR for a model that served fine); it
  stops it first at shutdown;
- ``POST /v2/repository/models/{name}/rollback`` (KServe's repository extension
  family; API key as for load/unload) serves again the last version that served
  well before the current one; it is what `edgefleet models rollback NAME` calls.
  Rollback is local only: the cmd topic refuses it (MQTT is unauthenticated as far
  as what serves goes); a fleet rolls back with a signed pin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from agent.config import AgentConfig, ModelEntry
from agent.context import CHECKED, CONFIG, LIVE, LOADER, MODELS, MQTT
from agent.http.errors import ApiError
from agent.http.jsonio import json_response
from runtime.errors import RuntimeLayerError, StoreError
from runtime.store import ModelStore
from security.errors import SecurityError
from sync.errors import SyncError
from sync.journal import Journal
from sync.mqtt import Topics

if TYPE_CHECKING:  # sync.updates brings python-tuf, urllib3 and securesystemslib: imported once updates are on
    from sync.updates import UpdateService

log = logging.getLogger(__name__)

UPDATES: web.AppKey[UpdateService] = web.AppKey("updates")
STORE = web.AppKey("store", ModelStore)
#: why the update service did not start (code, message): the reported state says so
UPDATES_PROBLEM = web.AppKey("updates_problem", tuple)


def with_managed_models(config: AgentConfig) -> AgentConfig:
    """With updates on, what serves is what ``[[models]]`` lists plus what the hub's last
    accepted desired state lists (a signed desired state may bring a name the config does
    not list). A stored model that neither lists does not serve: removing it from
    ``[[models]]`` and reloading unloads it, unless the hub lists it (the hub wins for the
    names it lists; `hub publish --remove NAME` stops it there)."""
    if not config.updates.enabled:
        return config
    from sync.updates import journal_path

    listed = {m.name for m in config.models}
    desired = Journal(journal_path(Path(config.state_dir))).data.desired
    stored = set(ModelStore(config.state_dir).names())
    extra = [n for n in desired if n in stored and n not in listed]
    for name in extra:
        log.info("model %s serves: the hub's signed desired state lists it ([[models]] does not)", name,
                 extra={"model": name})
    return config.with_overrides(models=[*config.models, *(ModelEntry(name=n) for n in extra)]) if extra else config


def build_service(config: AgentConfig, store: ModelStore, app: web.Application) -> UpdateService:
    from sync.tuf_client import HubClient
    from sync.updates import UpdateService

    settings = config.updates
    assert settings.hub_url is not None
    try:
        trust_root = Path(settings.trust_root).read_bytes()
    except OSError as exc:
        raise SecurityError(f"updates.trust_root {settings.trust_root}: cannot read it ({exc.strerror})") from None
    mqtt = config.mqtt
    hub = HubClient(Path(config.state_dir) / "tuf", settings.hub_url, trust_root, mqtt.group, mqtt.device_id,
                    timeout_s=settings.read_timeout_s, refresh_timeout_s=settings.refresh_timeout_s)
    topics = Topics(mqtt.topic_prefix, mqtt.group, mqtt.device_id)
    return UpdateService(settings, store, app[MODELS], hub, topics, Path(config.state_dir), link=app.get(MQTT),
                         configured=lambda: [m.name for m in app[LIVE].config.models])


async def recovery_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    if config.updates.enabled:
        from sync.updates import recover_after_crash

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
        app[UPDATES_PROBLEM] = (exc.code, str(exc))
        yield
        return
    app[UPDATES] = service

    async def start_when_loaded() -> None:
        await asyncio.shield(app[LOADER])
        if CHECKED in app:  # the service's start-up check probes what serves: no swap under it
            await app[CHECKED].wait()
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
        raise ApiError(409, "Signed updates are off on this agent ([updates] hub_url is unset), so nothing "
                       "was installed that could be rolled back.", code="updates_off")
    try:
        known = service.store.current(name) is not None
    except StoreError as exc:
        raise ApiError(400, _sentence(str(exc)), param="name") from None
    if not known:
        raise ApiError(404, f"There is no model named {name} in this agent's model store, so there is "
                       "nothing to roll back.", code="model_not_found")
    try:
        version = await service.rollback(name, reason="rolled back by the operator")
    except StoreError as exc:  # already a sentence: what is missing and why
        raise ApiError(409, _sentence(str(exc)), code="no_earlier_version") from None
    except (RuntimeLayerError, SyncError) as exc:
        raise ApiError(409, _sentence(f"Cannot roll {name} back: {exc}"), code="rollback_failed") from None
    return json_response({"name": name, "version": version, "state": "rolled-back"})


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


def setup(app: web.Application) -> None:
    app.router.add_post("/v2/repository/models/{name}/rollback", rollback_handler)


def offline_rollback(config: AgentConfig, name: str) -> str:
    """`models rollback` while no agent runs: switch `current` on disk to the last version that
    served well before it, and deny the version rolled back from (the next start serves it)."""
    from sync.updates import journal_path

    store = ModelStore(config.state_dir)
    current = store.current(name)
    journal = Journal(journal_path(Path(config.state_dir)))
    denied = {d.version for d in journal.data.deny if d.model == name}
    target = store.roll_back(name, reason="rolled back by the operator (agent not running)", skip=denied)
    if current is not None:
        journal.deny(name, current, "operator", "rolled back by the operator")
        with contextlib.suppress(OSError):
            journal.save()
    return target
