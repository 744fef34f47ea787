"""Endpoints for service managers and operators: /healthz, /readyz, /metrics, and
the KServe v2 model-repository extension to load and unload models at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.context import LIVE, METRICS, MODELS
from agent.fleet.telemetry import PUBLISHER
from agent.http.errors import ApiError
from agent.http.gate import can_see_detail
from agent.http.jsonio import json_response
from agent.local_models import with_imported_models
from runtime.bundle import read_bundle
from runtime.registry import ModelStatus

if TYPE_CHECKING:  # its outbox (sqlite3) is imported with [mqtt] only
    from sync.telemetry import TelemetryPublisher


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v2/repository/index", repository_index)
    app.router.add_post("/v2/repository/models/{name}/load", repository_load)
    app.router.add_post("/v2/repository/models/{name}/unload", repository_unload)


def _status_json(status: ModelStatus, detail: bool = True) -> dict[str, object]:
    if not detail:  # failure reasons name paths on disk: not for anonymous callers
        return {"name": status.name, "state": status.state.value}
    return {"name": status.name, "version": status.version, "state": status.state.value,
            "reason": status.error or ""}


async def healthz(request: web.Request) -> web.Response:
    """The process is up and its event loop answers."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Every configured model is loaded and serving. Open to all (service managers probe
    it); with API keys configured, versions and failure reasons need a valid one."""
    models = request.app[MODELS]
    ready = models.all_ready() and not request.app[LIVE].draining
    detail = can_see_detail(request)
    body: dict[str, object] = {"status": "ready" if ready else "not ready",
                               "models": [_status_json(s, detail) for s in models.statuses()]}
    publisher = request.app.get(PUBLISHER)
    if publisher is not None:  # a telemetry problem is shown, but does not make the agent unready
        body["telemetry"] = _telemetry_json(publisher, detail)
    return json_response(body, status=200 if ready else 503)


def _telemetry_json(publisher: TelemetryPublisher, detail: bool) -> dict[str, object]:
    failing = publisher.storage.error is not None
    out: dict[str, object] = {"storage": "failing" if failing else "ok", "records_lost": publisher.records_lost}
    if failing and detail:  # the reason names a path on disk
        out["reason"] = publisher.storage.error
    return out


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    response = web.Response(body=body)
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    response.charset = "utf-8"
    return response


async def repository_index(request: web.Request) -> web.Response:
    return json_response([_status_json(s) for s in request.app[MODELS].statuses()])


async def repository_load(request: web.Request) -> web.Response:
    """(Re)load a configured model from its bundle path; swaps atomically if serving."""
    config = request.app[LIVE].config
    name = request.match_info["name"]
    entry = next((m for m in with_imported_models(config).models if m.name == name), None)  # imported too
    if entry is None:
        raise ApiError(404, f"model '{name}' is not in the agent's configuration")
    bundle = read_bundle(config.bundle_path(entry), name=name)
    await request.app[MODELS].load(bundle)
    return web.Response(status=200)


async def repository_unload(request: web.Request) -> web.Response:
    await request.app[MODELS].unload(request.match_info["name"])
    return web.Response(status=200)
