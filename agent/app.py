"""The aiohttp application factory and the agent's lifecycle.

`create_app` builds the whole HTTP side from one AgentConfig. Each long-lived
resource is one cleanup context (start before ``yield``, stop after), so
shutdown happens in reverse start-up order: the server stops taking requests,
admitted requests finish, then models unload. Models load in a background task
owned by the registry's context, so the port answers /healthz at once and
/readyz turns 200 when the models are in.

Shutdown keeps to ``server.drain_timeout_s`` from the moment it starts (`drain`:
called by the service on SIGTERM while the port still answers, and again by
aiohttp's on_shutdown, where it finds the work done): new API requests get 503
``shutting_down``; admitted requests, queued or running, may finish until the
drain deadline less three graces; then queued ones get 503 and running ones are
stopped (a stream ends with finish_reason "shutdown" and ``[DONE]``); the
handlers get two graces to write their last bytes (`LiveState.in_flight` counts
them); aiohttp waits the last grace before it cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from agent.config import AgentConfig
from agent.context import CONFIG, LIVE, LOADER, METRICS, MODELS, LiveState
from agent.fleet import updates as updates_api
from agent.fleet.alerts import alerts_ctx
from agent.fleet.audit import audit_ctx
from agent.fleet.link import mqtt_ctx
from agent.fleet.reported import reported_ctx
from agent.fleet.telemetry import telemetry_ctx
from agent.fleet.updates import recovery_ctx, updates_ctx, with_managed_models
from agent.http import gate as request_gate
from agent.http import models_api, openai_api, ops_api, websocket
from agent.http.errors import ApiError, error_response, to_api_error
from agent.http.server import shutdown_grace_s
from agent.kserve import http_api as kserve_api
from agent.local_models import with_imported_models
from agent.metrics import Metrics
from runtime.backend import ModelLimits
from runtime.bundle import read_bundle
from runtime.devices import MachineSettings, describe_cpu
from runtime.errors import BundleError, RuntimeLayerError
from runtime.registry import ModelRegistry
from security.gate import PUBLIC, ROUTE_SCOPES

log = logging.getLogger(__name__)

#: health and readiness: answered while draining too (the gate's PUBLIC routes)
PUBLIC_PATHS = frozenset(path for path, scope in ROUTE_SCOPES.items() if scope == PUBLIC)


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
        elif err.status >= 500 and err.status != 503:
            log.error("%s %s: %s", request.method, request.path, err.message)
        return error_response(request.path, err)


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
    with live.admitted():
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


def machine_settings(config: AgentConfig, tuned: bool = True) -> MachineSettings:
    """The machine as `config` tells the runtime to use it (also what `edgefleet tune` measures);
    `tuned`: GGUF loads read the tuning cache (agent/tuning.py, imported only then)."""
    cpu_repack = None if config.runtime.cpu_repack == "auto" else bool(config.runtime.cpu_repack)
    source = None
    if tuned:
        from agent import tuning

        source = tuning.tuning_source(config)
    return MachineSettings(cpu=describe_cpu(), threads=config.runtime.threads, cpu_repack=cpu_repack,
                           batching=config.batching, tuning=source)


async def _registry_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    # Tuning is set up whatever is configured now: a GGUF model that arrives later (an update,
    # `models import`) is measured when it becomes active (agent/tuning.py).
    from agent import tuning

    machine = machine_settings(config)
    models = ModelRegistry(machine, config.scheduler.max_pending, config.server.drain_timeout_s,
                           limits_for=lambda name: model_limits(app[LIVE].config, name))
    app[MODELS] = models
    app[METRICS].watch(models)
    load = tuning.tune_then_load(config, machine, lambda: _load_configured(config, models)) if (
        config.tuning.mode == "before_ready") else _load_configured(config, models)
    app[LOADER] = asyncio.create_task(load, name="load-models")
    tuner = tuning.start_worker(config, machine, models, app[LOADER])
    yield
    await tuning.stop_worker(tuner)
    app[LOADER].cancel()
    await asyncio.gather(app[LOADER], return_exceptions=True)
    await models.close()


def model_limits(config: AgentConfig, name: str) -> ModelLimits:
    """What one request may use of model `name`, from the config."""
    limits = config.limits
    return ModelLimits(
        memory_budget_bytes=config.model_budget_mb(name) << 20,
        max_model_time_s=limits.max_model_time_s,
        max_messages=limits.max_messages,
        max_prompt_chars=limits.max_prompt_chars,
    )


async def drain(app: web.Application) -> None:
    """Stop taking API requests and let admitted ones finish within server.drain_timeout_s,
    counted from the first call; what is left at the deadline is stopped (see the module's
    docstring). Safe to call again: a later call keeps the first call's deadline."""
    live = app[LIVE]
    live.draining = True
    if live.drain_started is None:
        live.drain_started = time.monotonic()
    config = live.config.server
    grace = shutdown_grace_s(config)
    handlers_by = live.drain_started + config.drain_timeout_s - grace  # aiohttp's own wait takes the last grace
    jobs_by = handlers_by - 2 * grace
    if live.in_flight:
        log.info("draining: up to %.1fs for %d admitted request(s)", max(0.0, jobs_by - time.monotonic()),
                 live.in_flight, extra={"in_flight": live.in_flight})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(live.idle.wait(), max(0.0, jobs_by - time.monotonic()))
    if MODELS in app:  # queued requests get 503 now, running ones are stopped now
        await app[MODELS].begin_shutdown(time.monotonic(), grace)
    while live.in_flight and time.monotonic() < handlers_by:
        await asyncio.sleep(0.01)


async def _load_configured(config: AgentConfig, models: ModelRegistry) -> None:
    """Load what the config lists. Whatever goes wrong, every configured model ends up serving
    or shown as failed: /readyz never says ready while a configured model is missing."""
    try:
        await reconcile_models(config, models)
    except Exception as exc:  # a bug or an OS error: the models it did not reach are failed, not absent
        log.exception("loading the configured models failed")
        known = {status.name for status in models.statuses()}
        for entry in config.models:
            if entry.name not in known:
                models.record_failure(entry.name, str(config.bundle_path(entry)), f"not loaded: {exc}")


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
    config = with_managed_models(config)  # signed updates may bring models the config does not list
    config = with_imported_models(config)  # and `edgefleet models import` / `pull` (agent/local_models.py)
    wanted = {entry.name for entry in config.models}
    for status in models.statuses():
        if status.name not in wanted:
            with contextlib.suppress(RuntimeLayerError):
                await models.unload(status.name)
            changes.unloaded.append(status.name)
    serving = {served.name: served for served in models.serving()}
    for entry in config.models:  # every configured name is listed (as loading) before the first loads
        models.expect(entry.name, str(config.bundle_path(entry)))
    for entry in config.models:
        path = config.bundle_path(entry)
        try:
            bundle = read_bundle(path, name=entry.name)
        except (BundleError, OSError) as exc:  # OSError: a file the agent's user may not read
            reason = str(exc) if isinstance(exc, BundleError) else f"cannot read {exc.filename or path}: {exc.strerror}"
            log.error("model %s: %s", entry.name, reason, extra={"model": entry.name})
            if entry.name not in serving:
                models.record_failure(entry.name, str(path), reason)
            continue
        current = serving.get(entry.name)
        same_dir = current is not None and current.bundle.path.resolve() == bundle.path.resolve()
        if current is not None and current.version == bundle.version and same_dir:
            continue
        with contextlib.suppress(RuntimeLayerError):  # the registry logged it and shows it as failed
            await models.load(bundle)
            changes.loaded.append(entry.name)
    statuses = models.statuses()
    log.info("models: %s", ", ".join(f"{s.name}={s.state.value}" for s in statuses) or "none")
    return changes


async def grpc_ctx(app: web.Application) -> AsyncIterator[None]:
    """The KServe v2 gRPC server (agent/kserve/grpc_server.py), imported only when
    ``server.grpc_port`` is set: grpc, protobuf and numpy are not loaded without it."""
    if app[CONFIG].server.grpc_port is None:
        yield
        return
    from agent.kserve import grpc_server

    async for _ in grpc_server.grpc_ctx(app):
        yield


def create_app(config: AgentConfig) -> web.Application:
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=[metrics_middleware, error_middleware, drain_middleware, request_gate.gate_middleware],
    )
    app[CONFIG] = config
    app[LIVE] = LiveState(config)
    app[LIVE].idle.set()
    app[METRICS] = Metrics()
    request_gate.setup(app, config)  # API keys, scopes, limits (KeyFileError: the keys file is unusable)
    app.cleanup_ctx.append(recovery_ctx)  # signed updates: `current` is a verified version before models load
    app.cleanup_ctx.append(_registry_ctx)
    app.cleanup_ctx.append(grpc_ctx)  # after the registry: serves it
    app.cleanup_ctx.append(mqtt_ctx)  # after the registry: says offline before the models unload
    app.cleanup_ctx.append(telemetry_ctx)  # sampler, idle unload, telemetry over the link
    app.cleanup_ctx.append(updates_ctx)  # after the link: doorbells, commands
    app.cleanup_ctx.append(reported_ctx)  # after the update service, which it reports on; stopped first
    app.cleanup_ctx.append(alerts_ctx)  # after telemetry (sampler, outbox) and updates, which it reads
    app.cleanup_ctx.append(audit_ctx)  # last: records update steps, forwards through the outbox; seals first
    app.on_shutdown.append(drain)
    openai_api.setup(app)
    websocket.setup(app)  # /v1/realtime: chat streams over one WebSocket
    kserve_api.setup(app)
    ops_api.setup(app)
    models_api.setup(app)  # models without a hub: upload, import, remove, ps
    updates_api.setup(app)
    return app


async def wait_until_loaded(app: web.Application) -> None:
    """For callers (tests, the CLI) that want the configured models loaded before going on."""
    await asyncio.shield(app[LOADER])
