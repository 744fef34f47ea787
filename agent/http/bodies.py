"""Request bodies: read within the limits, decoded, and complete, or refused with a clear error.

Every handler that takes a body reads it here (`read_body`, `read_json`), so the OpenAI
and KServe endpoints refuse the same bodies the same way: 413 over
``server.max_body_bytes`` (before a byte is read when Content-Length says so), 415 for a
Content-Encoding we do not decode or a body that is not valid for it, 408 when it does
not arrive within ``server.body_timeout_s``.

Why bodies are decoded here and not by aiohttp's parser (agent/http/server.py turns its
``auto_decompress`` off): aiohttp checks that a deflate stream ended, but not a gzip one
(it accepts concatenated gzip members and starts a new one after each), nor a brotli
one, so a gzip or brotli body cut short reached the JSON parser as a cut document and
got a 400 that blamed the JSON. Here each member must end, nothing may follow the last,
and the decoded size is bounded while decoding (``max_length``), so a small compressed
body cannot expand past the limit.
The decoders are the standard library's zlib and, when installed, brotli and zstd.
"""

from __future__ import annotations

import asyncio
import importlib
import zlib
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web

from agent.context import CONFIG
from agent.http.errors import ApiError, bad_request
from agent.http.jsonio import loads


def _optional(module: str) -> Any:
    """An optional decoder's module, or None when it is not installed (as for aiohttp)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


brotli = _optional("brotli")
zstd = _optional("compression.zstd") or _optional("backports.zstd")  # the stdlib's from Python 3.14

#: Encoded bodies at least this large are decoded on a worker thread, off the event loop.
DECODE_OFF_LOOP_BYTES = 256 * 1024


class _Member(Protocol):
    """zlib's and zstd's decompressor objects: one member (gzip) or frame (zstd) each."""

    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = ...) -> bytes: ...


def _zlib_member(wbits: int) -> Callable[[bytes], _Member]:
    def new(data: bytes) -> _Member:
        if wbits == zlib.MAX_WBITS and data[:1] and data[0] & 0x0F != 8:
            return zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as some clients send it
        return zlib.decompressobj(wbits)
    return new


#: Content-Encoding -> a new decompressor for the data that follows.
_MEMBERS: dict[str, Callable[[bytes], _Member]] = {
    "gzip": _zlib_member(16 + zlib.MAX_WBITS),
    "x-gzip": _zlib_member(16 + zlib.MAX_WBITS),
    "deflate": _zlib_member(zlib.MAX_WBITS),
}
if zstd is not None:
    _MEMBERS["zstd"] = lambda data: zstd.ZstdDecompressor()

#: Content-Encodings read as they are, and those decoded here; any other is refused (415).
PLAIN_ENCODINGS = frozenset({"", "identity"})
DECODED_ENCODINGS = frozenset(_MEMBERS) | ({"br"} if brotli is not None else set())


class BodyDecodeError(ValueError):
    """The body is not valid for its Content-Encoding (corrupt, cut short, or followed by junk)."""


def too_large(limit: int, size: int | None = None) -> ApiError:
    said = f": {size} bytes" if size is not None else ""
    return ApiError(413, f"Request body too large{said}, the limit is {limit} bytes",
                    code="request_too_large", close=True)


def decode(raw: bytes, encoding: str, limit: int) -> bytes:
    """`raw` decoded from `encoding`; BodyDecodeError when it does not decode to its end,
    ApiError 413 as soon as the output passes `limit` bytes."""
    if encoding == "br":
        return _decode_brotli(raw, limit)
    new_member = _MEMBERS[encoding]
    out = bytearray()
    data = raw
    while True:
        member = new_member(data)
        try:
            out += member.decompress(data, limit + 1 - len(out))
        except Exception as exc:  # zlib.error, zstd.ZstdError: the bytes are not this encoding
            raise BodyDecodeError(f"it is not valid {encoding}") from exc
        if len(out) > limit:
            raise too_large(limit)
        if not member.eof:
            raise BodyDecodeError(f"the {encoding} data is cut short")
        data = member.unused_data
        if not data:
            return bytes(out)
        if encoding == "deflate":  # one zlib stream; gzip and zstd may have several members
            raise BodyDecodeError("bytes follow the end of the deflate data")


def _decode_brotli(raw: bytes, limit: int) -> bytes:
    assert brotli is not None
    decompressor = brotli.Decompressor()
    try:
        out = decompressor.process(raw, output_buffer_limit=limit + 1)
    except brotli.error as exc:
        raise BodyDecodeError("it is not valid br") from exc
    if len(out) > limit:
        raise too_large(limit)
    if not decompressor.is_finished():
        raise BodyDecodeError("the br data is cut short")
    return bytes(out)


async def read_body(request: web.Request) -> bytes:
    """The request's whole body, decoded; a 400/408/413/415 that says what is wrong with it.

    The body must arrive within server.body_timeout_s: a client that trickles it gets a
    408 and its connection closed instead of holding a handler."""
    server = request.app[CONFIG].server
    limit = server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit, request.content_length)
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in PLAIN_ENCODINGS and encoding not in DECODED_ENCODINGS:
        raise ApiError(415, "The request body's Content-Encoding is not supported (use "
                       f"{', '.join(sorted(DECODED_ENCODINGS))} or none)",
                       code="unsupported_content_encoding", close=True)
    try:
        async with asyncio.timeout(server.body_timeout_s):
            raw = await request.read()  # aiohttp enforces client_max_size while reading
    except TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {server.body_timeout_s:g}s",
                       code="request_timeout", close=True) from None
    if encoding in PLAIN_ENCODINGS or not raw:
        return raw
    try:
        if len(raw) >= DECODE_OFF_LOOP_BYTES:
            return await asyncio.to_thread(decode, raw, encoding, limit)
        return decode(raw, encoding, limit)
    except BodyDecodeError as exc:
        raise ApiError(415, f"The request body cannot be decoded as its Content-Encoding says: {exc}",
                       code="unsupported_content_encoding", close=True) from None


async def read_json(request: web.Request) -> Any:
    """The request's JSON body, or a 400/408/413/415 that says what is wrong with it."""
    raw = await read_body(request)
    if not raw:
        raise bad_request("The request body is empty; send a JSON object")
    try:
        return loads(raw)
    except ValueError as exc:  # orjson.JSONDecodeError, invalid UTF-8
        raise bad_request(f"We could not parse the JSON body of your request: {exc}") from None
