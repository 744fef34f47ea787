"""The aiohttp application factory and the agent's lifecycle.

`create_app` builds the whole HTTP side from one AgentConfig. Each long-lived
resource is one cleanup context (start before ``yield``, stop after), so
shutdown happens in reverse start-up order: the server stops taking requests,
admitted requests finish, then models unload. Models load in a background task
owned by the registry's context, so the port answers /healthz at once and
/readyz turns 200 when the models are in.

Shutdown keeps to ``server.drain_timeout_s`` from the moment it starts (`_drain`,
on_shutdown): queued requests are answered 503 at once; running ones may go on
until the drain deadline less three graces and are then stopped (a stream ends
with finish_reason "shutdown" and ``[DONE]``); the handlers get two graces to
write their last bytes (`InFlight` counts them); aiohttp waits the last grace
before it cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from runtime.backend import ModelLimits
from runtime.bundle import read_bundle
from runtime.devices import MachineSettings, describe_cpu
from runtime.errors import BundleError, RuntimeLayerError
from runtime.registry import ModelRegistry
from security.api_keys import api_key_matches

from . import openai_api, ops_api
from .config import AgentConfig
from .context import CONFIG, METRICS, MODELS
from .errors import ApiError, error_response, to_api_error
from .http_server import shutdown_grace_s
from .kserve import http_api as kserve_api
from .metrics import Metrics

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
LOADER = web.AppKey("loader", asyncio.Task)


@dataclass
class InFlight:
    """HTTP requests whose handlers have not returned: what shutdown waits for."""

    count: int = 0


IN_FLIGHT = web.AppKey("in_flight", InFlight)

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
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    api_key = request.app[CONFIG].server.api_key
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
    in_flight = request.app[IN_FLIGHT]
    in_flight.count += 1
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499  # client closed the connection (nginx's convention)
        raise
    finally:
        in_flight.count -= 1
        metrics.requests.labels(route, request.method, str(status)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - started)


async def _registry_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    cpu_repack = None if config.runtime.cpu_repack == "auto" else bool(config.runtime.cpu_repack)
    machine = MachineSettings(cpu=describe_cpu(), threads=config.runtime.threads, cpu_repack=cpu_repack)
    models = ModelRegistry(machine, config.scheduler.max_pending, config.server.drain_timeout_s,
                           limits_for=lambda name: model_limits(config, name))
    app[MODELS] = models
    app[METRICS].watch(models)
    app[LOADER] = asyncio.create_task(_load_configured(config, models), name="load-models")
    yield
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


async def _drain(app: web.Application) -> None:
    """on_shutdown: runs once the listening socket is closed, before aiohttp waits for the
    handlers. Queued requests get 503 now; running ones are stopped at the deadline."""
    config = app[CONFIG].server
    grace = shutdown_grace_s(config)
    started = time.monotonic()
    handlers_by = started + config.drain_timeout_s - grace  # aiohttp's own wait takes the last grace
    jobs_by = handlers_by - 2 * grace
    log.info("draining: up to %.1fs for running requests", max(0.0, jobs_by - started))
    if MODELS in app:
        await app[MODELS].begin_shutdown(jobs_by, grace)
    while app[IN_FLIGHT].count and time.monotonic() < handlers_by:
        await asyncio.sleep(0.01)


async def _load_configured(config: AgentConfig, models: ModelRegistry) -> None:
    for entry in config.models:
        path = config.bundle_path(entry)
        try:
            bundle = read_bundle(path, name=entry.name)
        except BundleError as exc:
            log.error("model %s: %s", entry.name, exc)
            models.record_failure(entry.name, str(path), str(exc))
            continue
        with contextlib.suppress(RuntimeLayerError):  # the registry logged it and shows it as failed
            await models.load(bundle)
    statuses = models.statuses()
    log.info("models: %s", ", ".join(f"{s.name}={s.state.value}" for s in statuses) or "none")


def create_app(config: AgentConfig) -> web.Application:
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=[metrics_middleware, error_middleware, auth_middleware],
    )
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[IN_FLIGHT] = InFlight()
    app.cleanup_ctx.append(_registry_ctx)
    app.on_shutdown.append(_drain)
    openai_api.setup(app)
    kserve_api.setup(app)
    ops_api.setup(app)
    return app


async def wait_until_loaded(app: web.Application) -> None:
    """For callers (tests, the CLI) that want the configured models loaded before going on."""
    await asyncio.shield(app[LOADER])
