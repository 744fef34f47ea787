"""Ollama's per-request ``keep_alive`` on the OpenAI endpoints (an extension field).

``"keep_alive": "5m"`` (a Go duration: ``ms``, ``s``, ``m``, ``h``, combinable as
``"1h30m"``), a number of seconds, ``0`` (unload the model as soon as this request is
done) or a negative value (``-1``: keep it loaded forever). It sets the model's keep-alive
in the registry, as Ollama does, until the next request that says otherwise or a restart;
without it the config's ``keep_alive_s`` applies. The idle unload itself is the
registry's (runtime/registry.py `unload_idle`, `release_when_idle`).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from agent.context import MODELS
from agent.http.errors import bad_request

DURATION_RE = re.compile(r"^(-?)((?:\d+(?:\.\d+)?(?:ms|s|m|h))+)$")
PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float | None:
    """Seconds (negative: forever, 0: unload after the request); None when absent. 400 when bad."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad_request("keep_alive must be a duration like \"5m\", a number of seconds, 0 or -1",
                          param="keep_alive")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip()
        match = DURATION_RE.match(text)
        try:
            seconds = float(text) if match is None else (-1 if match[1] else 1) * sum(
                float(n) * UNIT_S[unit] for n, unit in PART_RE.findall(match[2]))
        except ValueError:
            raise bad_request(f"keep_alive {value!r} is not a duration (like \"5m\", \"30s\", \"1h30m\"), "
                              "a number of seconds, 0 or -1", param="keep_alive") from None
    if seconds != seconds or abs(seconds) == float("inf"):
        raise bad_request("keep_alive must be finite", param="keep_alive")
    return seconds


@asynccontextmanager
async def keep_alive(request: web.Request, model: str, body: Any) -> AsyncIterator[None]:
    """Apply the request's keep_alive to `model` around the request's work."""
    seconds = parse_keep_alive(body.get("keep_alive") if isinstance(body, dict) else None)
    models = request.app[MODELS]
    known = seconds is not None and any(s.name == model for s in models.statuses())
    if known and seconds is not None:
        models.set_keep_alive(model, seconds)
    try:
        yield
    finally:
        if known and seconds == 0:
            models.release_when_idle(model)
