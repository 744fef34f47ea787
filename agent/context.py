"""Typed keys for what the app shares between handlers (request bodies: agent/http/bodies.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from agent.config import AgentConfig
from agent.metrics import Metrics
from runtime.registry import ModelRegistry
from security.audit import AuditLog

if TYPE_CHECKING:  # its module imports paho: only an agent with [mqtt] loads it (agent/fleet/link.py)
    from sync.mqtt import MqttLink

CONFIG = web.AppKey("config", AgentConfig)
MODELS = web.AppKey("models", ModelRegistry)
METRICS = web.AppKey("metrics", Metrics)
#: Present only when ``[mqtt]`` is configured (agent/fleet/link.py).
MQTT: web.AppKey[MqttLink] = web.AppKey("mqtt")
#: The audit log (agent/fleet/audit.py); absent while ``[audit]`` is off: callers use ``app.get(AUDIT)``.
AUDIT = web.AppKey("audit", AuditLog)
#: The task that loads the configured models at start; what must wait for them awaits it.
LOADER = web.AppKey("loader", asyncio.Task)
#: Set once the models loaded at start have answered their first request (the service's
#: start-up check, before READY); present only where that check runs (agent/lifecycle/service.py).
#: Signed updates wait for it, so they never swap a version out from under the check.
CHECKED = web.AppKey("checked", asyncio.Event)


@dataclass
class LiveState:
    """What changes while the app runs: the config a reload applied, and draining.

    aiohttp freezes the app's own state once it starts, and a SIGHUP must still
    change the API key and the model list; so the current config lives here and
    `CONFIG` keeps the one the app was built with (what needs a restart to change).
    """

    config: AgentConfig
    #: Set on SIGTERM: new requests get 503, admitted ones finish.
    draining: bool = False
    #: API requests being handled now (streams count until their last byte).
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    #: When draining began (time.monotonic()); the drain deadline counts from it.
    drain_started: float | None = None

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Count one API request (HTTP or gRPC) as in flight while the block runs: what the
        shutdown drain waits for."""
        self.in_flight += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()


LIVE = web.AppKey("live", LiveState)
