"""The aiohttp application factory and the agent's lifecycle.

`create_app` builds the whole HTTP side from one AgentConfig. Each long-lived
resource is one cleanup context (start before ``yield``, stop after), so
shutdown happens in reverse start-up order: the server stops taking requests,
admitted requests finish, then models unload. Models load in a background task
owned by the registry's context, so the port answers /healthz at once and
/readyz turns 200 when the models are in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from runtime.bundle import read_bundle
from runtime.devices import MachineSettings, describe_cpu
from runtime.errors import BundleError, RuntimeLayerError
from runtime.registry import ModelRegistry
from security.api_keys import api_key_matches

from . import openai_api, ops_api
from .config import AgentConfig
from .context import CONFIG, LIVE, METRICS, MODELS, LiveState
from .errors import ApiError, kserve_error_response, openai_error_response, to_api_error
from .kserve import http_api as kserve_api
from .metrics import Metrics

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
LOADER = web.AppKey("loader", asyncio.Task)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every failure in the convention of the API that was called."""
    try:
        return await handler(request)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # mapped in one place; unknown errors are logged, not shown
        err = to_api_error(exc)
        if err.status >= 500 and not isinstance(exc, (ApiError, RuntimeLayerError)):
            log.exception("unhandled error on %s %s", request.method, request.path)
        elif err.status >= 500:
            log.error("%s %s: %s", request.method, request.path, err.message)
        render = kserve_error_response if request.path.startswith("/v2") else openai_error_response
        return render(err)


@web.middleware
async def drain_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count requests in flight, and refuse new ones once shutdown has begun.

    On SIGTERM the port stays open while admitted requests finish, so a client
    that arrives then gets a 503 in the API's error JSON (and Connection: close)
    rather than a refused connection it cannot tell from a crash.
    """
    live = request.app[LIVE]
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    if live.draining:
        raise ApiError(503, "The agent is shutting down and takes no new requests; retry shortly",
                       type="unavailable_error", code="shutting_down",
                       headers={"Retry-After": "5", "Connection": "close"})
    live.in_flight += 1
    live.idle.clear()
    try:
        return await handler(request)
    finally:
        live.in_flight -= 1
        if live.in_flight == 0:
            live.idle.set()


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    api_key = request.app[LIVE].config.server.api_key
    if (api_key and request.path not in PUBLIC_PATHS
            and not api_key_matches(api_key, request.headers.get("Authorization"))):
        raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS]
    route = _route_label(request)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499  # client closed the connection (nginx's convention)
        raise
    finally:
        metrics.requests.labels(route, request.method, str(status)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - started)


async def _registry_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    cpu_repack = None if config.runtime.cpu_repack == "auto" else bool(config.runtime.cpu_repack)
    machine = MachineSettings(cpu=describe_cpu(), threads=config.runtime.threads, cpu_repack=cpu_repack)
    models = ModelRegistry(machine, config.scheduler.max_pending, config.server.drain_timeout_s)
    app[MODELS] = models
    app[METRICS].watch(models)
    app[LOADER] = asyncio.create_task(_load_configured(config, models), name="load-models")
    yield
    app[LOADER].cancel()
    await asyncio.gather(app[LOADER], return_exceptions=True)
    await models.close()


async def _load_configured(config: AgentConfig, models: ModelRegistry) -> None:
    await reconcile_models(config, models)


@dataclass
class ModelChanges:
    """What `reconcile_models` did, for the log of a reload."""

    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"loaded {', '.join(self.loaded)}"] if self.loaded else []
        parts += [f"unloaded {', '.join(self.unloaded)}"] if self.unloaded else []
        return "; ".join(parts) or "unchanged"


async def reconcile_models(config: AgentConfig, models: ModelRegistry) -> ModelChanges:
    """Make the registry serve what `config` lists: load new or changed bundles (hot swap),
    unload names no longer listed. Failures are logged and shown in /readyz, not raised."""
    changes = ModelChanges()
    wanted = {entry.name for entry in config.models}
    for status in models.statuses():
        if status.name not in wanted:
            with contextlib.suppress(RuntimeLayerError):
                await models.unload(status.name)
            changes.unloaded.append(status.name)
    serving = {served.name: served for served in models.serving()}
    for entry in config.models:
        path = config.bundle_path(entry)
        try:
            bundle = read_bundle(path, name=entry.name)
        except BundleError as exc:
            log.error("model %s: %s", entry.name, exc, extra={"model": entry.name})
            if entry.name not in serving:
                models.record_failure(entry.name, str(path), str(exc))
            continue
        current = serving.get(entry.name)
        if current is not None and current.version == bundle.version and current.bundle.path == bundle.path:
            continue
        with contextlib.suppress(RuntimeLayerError):  # the registry logged it and shows it as failed
            await models.load(bundle)
            changes.loaded.append(entry.name)
    statuses = models.statuses()
    log.info("models: %s", ", ".join(f"{s.name}={s.state.value}" for s in statuses) or "none")
    return changes


def create_app(config: AgentConfig) -> web.Application:
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=[metrics_middleware, error_middleware, drain_middleware, auth_middleware],
    )
    app[CONFIG] = config
    app[LIVE] = LiveState(config)
    app[LIVE].idle.set()
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_registry_ctx)
    openai_api.setup(app)
    kserve_api.setup(app)
    ops_api.setup(app)
    return app


async def wait_until_loaded(app: web.Application) -> None:
    """For callers (tests, the CLI) that want the configured models loaded before going on."""
    await asyncio.shield(app[LOADER])
