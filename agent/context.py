"""Typed keys for what the app shares between handlers, and request-body reading."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from runtime.registry import ModelRegistry

from .config import AgentConfig
from .errors import ApiError, bad_request
from .jsonio import loads
from .metrics import Metrics

CONFIG = web.AppKey("config", AgentConfig)
MODELS = web.AppKey("models", ModelRegistry)
METRICS = web.AppKey("metrics", Metrics)


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


LIVE = web.AppKey("live", LiveState)


async def read_json(request: web.Request) -> Any:
    """The request's JSON body, or a 400/413 that says what is wrong with it."""
    limit = request.app[CONFIG].server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"Request body too large: {request.content_length} bytes, "
                       f"the limit is {limit}", code="request_too_large")
    raw = await request.read()  # aiohttp enforces client_max_size while reading
    if not raw:
        raise bad_request("The request body is empty; send a JSON object")
    try:
        return loads(raw)
    except ValueError as exc:  # orjson.JSONDecodeError, invalid UTF-8
        raise bad_request(f"We could not parse the JSON body of your request: {exc}") from None
