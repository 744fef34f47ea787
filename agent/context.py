"""Typed keys for what the app shares between handlers, and request-body reading."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import compression_utils, web

from agent.config import AgentConfig
from agent.http.errors import ApiError, bad_request
from agent.http.jsonio import loads
from agent.metrics import Metrics
from runtime.registry import ModelRegistry
from sync.mqtt import MqttLink

#: Content-Encodings aiohttp decodes here; any other is refused rather than read as JSON.
DECODED_ENCODINGS = frozenset(
    {"", "identity", "gzip", "x-gzip", "deflate"}
    | ({"br"} if compression_utils.HAS_BROTLI else set())
    | ({"zstd"} if compression_utils.HAS_ZSTD else set())
)

CONFIG = web.AppKey("config", AgentConfig)
MODELS = web.AppKey("models", ModelRegistry)
METRICS = web.AppKey("metrics", Metrics)
#: Present only when ``[mqtt]`` is configured (agent/fleet/link.py).
MQTT = web.AppKey("mqtt", MqttLink)
#: The task that loads the configured models at start; what must wait for them awaits it.
LOADER = web.AppKey("loader", asyncio.Task)


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


async def read_json(request: web.Request) -> Any:
    """The request's JSON body, or a 400/408/413 that says what is wrong with it.

    The body must arrive within server.body_timeout_s: a client that trickles it
    gets a 408 and its connection closed instead of holding a handler."""
    server = request.app[CONFIG].server
    limit = server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"Request body too large: {request.content_length} bytes, "
                       f"the limit is {limit}", code="request_too_large", close=True)
    if request.headers.get("Content-Encoding", "").strip().lower() not in DECODED_ENCODINGS:
        raise ApiError(415, "The request body's Content-Encoding is not supported (use gzip, deflate or none)",
                       code="unsupported_content_encoding", close=True)
    try:
        async with asyncio.timeout(server.body_timeout_s):
            raw = await request.read()  # aiohttp enforces client_max_size while reading
    except TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {server.body_timeout_s:g}s",
                       code="request_timeout", close=True) from None
    if not raw:
        raise bad_request("The request body is empty; send a JSON object")
    try:
        return loads(raw)
    except ValueError as exc:  # orjson.JSONDecodeError, invalid UTF-8
        raise bad_request(f"We could not parse the JSON body of your request: {exc}") from None
