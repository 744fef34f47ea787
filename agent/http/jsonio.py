"""JSON in and out of the HTTP API, with orjson.

orjson serialises numpy arrays directly, and float32 values in their shortest
round-tripping form: an embedding response is half the bytes and twenty times
faster to produce than with the standard library, and decodes to exactly the
same float32 values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def dumps(data: Any) -> str:
    return orjson.dumps(data, option=OPTIONS).decode("utf-8")


def loads(raw: bytes) -> Any:
    return orjson.loads(raw)


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=OPTIONS), status=status, headers=headers,
        content_type="application/json",
    )
