"""The agent as a long-running service: start, report to systemd, reload, drain, stop.

`serve` owns everything that lives as long as the process: the HTTP site, the
watchdog task, reload tasks and the signal handlers. What it tells systemd:

- ``STATUS=`` lines at each step (``systemctl status`` shows the last one);
- ``READY=1`` only when the port listens *and* every configured model that
  loaded has answered a real request (a 1-token generation, a 1-text
  embedding): "started" is not "healthy";
- ``WATCHDOG=1`` every half ``$WATCHDOG_USEC``, sent by a task on the event
  loop itself, so a loop stuck in a blocking call stops pinging and systemd
  restarts the agent;
- ``RELOADING=1`` … ``READY=1`` around a SIGHUP reload, ``STOPPING=1`` on SIGTERM.

SIGTERM drains (agent/app.py `drain`): the port stays open, new API requests get
a 503 in the API's error JSON, admitted requests (streams included) finish within
``server.drain_timeout_s`` or are stopped at its end, then the server closes and
models unload.
SIGHUP re-reads the config: a broken one is refused with one log line and the
running config keeps serving; a good one applies what can change live (API key,
log level, limits, models added, removed or changed) and logs what needs a restart.
It also re-reads the TLS certificate, key and client CA files (when TLS is on), for new
handshakes only: files that fail their checks are refused with one log line (and
`edgefleet doctor` shows it), and the running certificate stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from agent import __version__
from agent.app import create_app, drain, reconcile_models, wait_until_loaded
from agent.config import AgentConfig
from agent.context import AUDIT, CHECKED, LIVE, MODELS
from agent.http.gate import GATE, KEYS_KEPT, reload_keys
from agent.http.server import SERVER_TLS, bind_reason, start_server
from agent.lifecycle.logs import setup_logging
from agent.lifecycle.process import trim_heap
from agent.lifecycle.sdnotify import Notifier, watchdog_interval_s
from runtime.registry import ModelRegistry, ModelState
from security.keys_file import KeyFileError
from security.tls_server import LoadedTls, TlsFilesError

log = logging.getLogger("edgefleet")


class ServeError(Exception):
    """The service cannot start (the port is taken); one line for the operator."""


class ConfigRefused(Exception):
    """A reload's config cannot be used; the message says why."""


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


#: Read once when the agent starts (the listening sockets and the server around the app).
SERVER_AT_START = ("host", "port", "max_body_bytes", "keepalive_timeout_s", "header_timeout_s",
                   "body_timeout_s", "max_connections", "max_header_bytes", "grpc_port",
                   "tls_cert_file", "tls_key_file", "tls_client_ca_file", "tls_client_cert")
#: Sections read once at start: the model runtime, the MQTT link and what runs over it.
SECTIONS_AT_START = ("runtime", "batching", "mqtt", "telemetry", "updates")


def needs_restart(old: AgentConfig, new: AgentConfig) -> list[str]:
    """Keys whose change a reload cannot apply to a running agent."""
    keys = []
    if old.state_dir != new.state_dir:
        keys.append("state_dir")
    keys += [f"server.{key}" for key in SERVER_AT_START if getattr(old.server, key) != getattr(new.server, key)]
    for section in SECTIONS_AT_START:
        old_part, new_part = getattr(old, section), getattr(new, section)
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(old_part)
                 if getattr(old_part, f.name) != getattr(new_part, f.name)]
    return keys


def live_part(old: AgentConfig, new: AgentConfig) -> AgentConfig:
    """`new`, with the keys that need a restart kept as they run now."""
    server = dataclasses.replace(new.server, **{key: getattr(old.server, key) for key in SERVER_AT_START})
    sections = {section: getattr(old, section) for section in SECTIONS_AT_START}
    return dataclasses.replace(new, state_dir=old.state_dir, server=server, **sections)


class Service:
    """One run of the agent, from bind to exit."""

    def __init__(self, config: AgentConfig, reload_config: Callable[[], AgentConfig],
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self._reload_config = reload_config
        self.notifier = notifier or Notifier()
        try:
            self.app = create_app(config)
        except KeyFileError as exc:  # the API keys file: the agent does not start without its keys
            raise ServeError(f"cannot use the API keys: {exc}") from None
        self.app[CHECKED] = asyncio.Event()  # set after the start-up check; signed updates wait for it
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def _status(self, text: str, **extra: str | int) -> None:
        self.notifier.send(STATUS=text, **extra)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Start a task the service owns: cancelled and awaited at shutdown."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run(self) -> None:
        config = self.config
        self._status("starting")
        try:
            runner = await start_server(self.app, config.server)
        except TlsFilesError as exc:
            raise ServeError(f"cannot serve TLS: {exc}") from None
        except OSError as exc:  # the HTTP port, or the gRPC port (named in `filename`)
            where = exc.filename or f"{config.server.host}:{config.server.port}"
            option = "server.grpc_port / --grpc-port" if exc.filename else "server.port / --port"
            reason = exc.strerror if exc.filename else bind_reason(exc)
            raise ServeError(f"cannot listen on {where}: {reason} (stop what uses it, "
                             f"or choose another {option})") from None
        log.info("edgefleet %s listening on %s://%s:%d", __version__, config.server.scheme, config.server.host,
                 config.server.port, extra={"host": config.server.host, "port": config.server.port})
        if not self.app[GATE].required and not is_loopback(config.server.host):
            log.warning("listening on %s without an API key: anyone who can reach this port can "
                        "use the models (set server.api_key)", config.server.host)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload(), "reload"))
        interval = watchdog_interval_s()
        if interval is not None and self.notifier.enabled:
            self._spawn(self._watchdog(interval), "watchdog")
            log.info("watchdog ping every %.3gs", interval, extra={"interval_s": interval})
        self._spawn(self._become_ready(), "ready")
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self._shutdown(runner)

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.send(WATCHDOG=1)
            await asyncio.sleep(interval)

    async def _become_ready(self) -> None:
        models = self.app[MODELS]
        if not self.config.models and not self.config.updates.enabled:
            log.warning("no models to serve: add [[models]] entries naming bundles under %s (or set "
                        "EDGEFLEET_MODELS='[{name = \"NAME\"}]'), or set [updates] to take them from a hub; "
                        "see docs/operations.md", Path(self.config.state_dir) / "models")
        self._status(f"loading {len(self.config.models)} model(s)")
        await wait_until_loaded(self.app)  # never raises: what failed is shown as failed
        try:
            await self._probe_all(models)
        finally:
            self.app[CHECKED].set()
        if self.app[LIVE].draining:  # SIGTERM came while loading: never say READY after STOPPING
            return
        self.notifier.send(READY=1, STATUS=self._serving_line(models))
        log.info("ready", extra={"models": len(models.serving())})
        await asyncio.to_thread(trim_heap)  # start-up's freed heap back to the system (agent/lifecycle/process.py)

    async def _probe_all(self, models: ModelRegistry, names: list[str] | None = None) -> None:
        for served in models.serving():
            if names is not None and served.name not in names:
                continue
            self._status(f"checking {served.name} with a real request")
            started = time.monotonic()
            try:
                await served.probe()  # the model's own smoke test, as signed updates run it
            except Exception as exc:  # noqa: BLE001 - reported; the agent still serves the others
                log.error("model %s loaded but did not answer: %s", served.name, exc, extra={"model": served.name})
            else:
                log.info("model %s answers (%.2fs)", served.name, time.monotonic() - started,
                         extra={"model": served.name})

    def _serving_line(self, models: ModelRegistry) -> str:
        statuses = models.statuses()
        ready = [s.name for s in statuses if s.state is ModelState.READY]
        failed = [s.name for s in statuses if s.state is ModelState.FAILED]
        line = f"serving {len(ready)} model(s): {', '.join(ready) or 'none'}"
        if failed:
            line += f"; failed: {', '.join(failed)} (see the log)"
        return line

    async def reload(self) -> None:
        """Re-read the config (SIGHUP) and apply what can change live."""
        async with self._reload_lock:
            live = self.app[LIVE]
            if live.draining:
                return
            log.info("reloading the configuration")
            self.notifier.send(RELOADING=1, STATUS="reloading the configuration",
                               MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
            models = self.app[MODELS]
            try:
                await self._reload_tls()  # the files, whatever the config file says now
                try:
                    new = self._reload_config()
                except ConfigRefused as exc:
                    log.error("reload refused, the running configuration stays: %s", exc)
                    keys = await reload_keys(self.app, live.config)  # the keys file is re-read all the same
                    self._audit_reload("denied", reason=str(exc), keys=keys)
                    return
                old = live.config
                restart = needs_restart(old, new)
                live.config = applied = live_part(old, new)
                keys = await reload_keys(self.app, applied)  # an unusable keys file keeps the keys in force
                setup_logging(applied.log_level)
                models.set_limits(applied.scheduler.max_pending, applied.server.drain_timeout_s)
                await wait_until_loaded(self.app)
                changes = await reconcile_models(applied, models)
                await self._probe_all(models, changes.loaded)
                log.info("configuration reloaded", extra={
                    "api_key": "changed" if old.server.api_key != applied.server.api_key else "same",
                    "models": str(changes), "log_level": applied.log_level})
                if restart:
                    log.warning("changed but applied only after a restart: %s", ", ".join(restart),
                                extra={"restart_needed": ",".join(restart)})
                self._audit_reload("error" if keys.startswith(KEYS_KEPT) else "ok", models=str(changes), keys=keys)
            except Exception:  # a bug in applying must not kill the agent; the old models keep serving
                log.exception("reload failed while applying the new configuration")
                self._audit_reload("error")
            finally:
                self.notifier.send(READY=1, STATUS=self._serving_line(models))

    def _audit_reload(self, outcome: str, **detail: str) -> None:
        audit = self.app.get(AUDIT)
        if audit is not None:
            audit.record("local", "config.reload", "agent", outcome, **detail)

    async def _reload_tls(self) -> None:
        """Re-read the endpoint's certificate files for new handshakes; refused files leave the
        running certificate in place."""
        tls = self.app.get(SERVER_TLS)
        if tls is None:
            return
        running = tls.current
        try:
            loaded = await asyncio.to_thread(tls.reload)
        except TlsFilesError as exc:
            log.error("TLS reload refused, the running certificate stays (%s): %s", _described(running), exc,
                      extra={"tls_serial": f"{running.serial:x}"})
            return
        if loaded.serial == running.serial:
            log.info("TLS files re-read: the same certificate (%s)", _described(loaded))
        else:
            log.info("TLS certificate reloaded for new connections: %s", _described(loaded),
                     extra={"tls_serial": f"{loaded.serial:x}"})

    async def _shutdown(self, runner: web.AppRunner) -> None:
        live = self.app[LIVE]
        log.info("shutting down: finishing %d admitted request(s) (up to %.0fs); new ones get 503",
                 live.in_flight, live.config.server.drain_timeout_s, extra={"in_flight": live.in_flight})
        self.notifier.send(STOPPING=1, STATUS=f"draining {live.in_flight} request(s)")
        await drain(self.app)  # the port still answers meanwhile: new clients get a 503, not a refusal
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._status("stopping: unloading models")
        await runner.cleanup()
        log.info("stopped")
        self.notifier.close()


def _described(loaded: LoadedTls) -> str:
    return f"serial {loaded.serial:x}, valid until {loaded.not_after:%Y-%m-%d %H:%M} UTC"


def serve(config: AgentConfig, reload_config: Callable[[], AgentConfig]) -> None:
    """Run the service until SIGTERM/SIGINT (blocking; the process's one event loop)."""

    async def main() -> None:
        await Service(config, reload_config).run()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
