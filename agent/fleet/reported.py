"""The reported state: what this device runs, beside what it was told to run.

The birth message (`state`) says what serves, and the Last Will overwrites it
when the device goes away; the update topic says how the last job went. Neither
tells an operator whether the device ever heard of a release, or why not. This
one retained message (``{prefix}/devices/{id}/reported``, ``edgefleet.reported/1``,
docs/mqtt.md) does: per model the desired version and where it came from (group,
device, pin or a rollout), the active version, the job under way; the last job;
and the update service's own health (ok, hub-unreachable since when, refused,
trust-root-unreadable, disabled) with its last successful check. A Last Will
does not touch it, so an offline device still shows what it last ran.

It is published after every connect and whenever any of it changes (a burst of
changes is one message); the hub's `status` and its rollout controller read it.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agent import __version__
from agent.context import CONFIG, MODELS, MQTT
from agent.fleet.link import Republisher
from agent.fleet.updates import UPDATES, UPDATES_PROBLEM
from runtime.registry import ModelState
from sync.update_health import Health, UpdateHealth

if TYPE_CHECKING:  # the link's module imports paho: only an agent with [mqtt] loads it
    from sync.mqtt import MqttLink

log = logging.getLogger(__name__)

SCHEMA = "edgefleet.reported/1"


def reported_payload(app: web.Application, seq: int) -> dict[str, Any]:
    config = app[CONFIG]
    service = app.get(UPDATES)
    if service is not None:
        updates = service.reported()
    else:
        health = UpdateHealth()
        if not config.updates.enabled:
            health.set(Health.DISABLED, message="[updates] hub_url is unset")
        else:
            code, message = app.get(UPDATES_PROBLEM, ("trust-root", "the update service did not start"))
            health.set(Health.TRUST_ROOT_UNREADABLE, code, message)
        updates = {"updates": {**health.to_json(), "check_interval_s": None}, "desired": {}, "jobs": {},
                   "jobs_last": {}, "last_job": None, "denied": []}
    statuses = {s.name: s for s in app[MODELS].statuses()} if MODELS in app else {}
    models = {}
    for name in sorted(set(statuses) | set(updates["desired"])):
        status = statuses.get(name)
        models[name] = {
            "desired": updates["desired"].get(name),
            "active": status.version if status is not None and status.state is not ModelState.FAILED else None,
            "state": status.state.value if status is not None else None,
            "job": updates["jobs"].get(name),
        }
    return {
        "schema": SCHEMA,
        "device_id": config.mqtt.device_id,
        "group": config.mqtt.group,
        "agent_version": __version__,
        "seq": seq,
        "at": round(time.time(), 3),
        "updates": updates["updates"],
        "models": models,
        "last_job": updates["last_job"],
        "jobs_last": updates["jobs_last"],
        "denied": updates["denied"],
    }


async def reported_ctx(app: web.Application) -> AsyncIterator[None]:
    """After the update service's context: it is there (or known absent) when this starts."""
    link: MqttLink | None = app.get(MQTT)
    if link is None:
        yield
        return
    counter = itertools.count(1)

    async def publish() -> None:
        await link.publish(link.topics.reported, reported_payload(app, next(counter)), retain=True)

    republisher = Republisher(link, publish, "reported state")

    async def on_connect(info: Any) -> None:
        republisher.soon()

    link.add_connect_hook(on_connect)
    unsubscribe = app[MODELS].subscribe(republisher.on_event) if MODELS in app else None
    service = app.get(UPDATES)
    if service is not None:
        service.on_change(republisher.soon)
    try:
        yield
    finally:
        if unsubscribe is not None:
            unsubscribe()
        await republisher.close()
