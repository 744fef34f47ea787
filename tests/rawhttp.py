"""Raw HTTP over a socket, for requests no HTTP client would send (slow, malformed)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse(raw: bytes) -> RawResponse | None:
    """The first response in `raw` (None when nothing came back)."""
    if not raw:
        return None
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return RawResponse(status, headers, body)


async def exchange(port: int, data: bytes, timeout: float = 10.0) -> RawResponse | None:
    """Send `data`, read until the server closes the connection, parse the first response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        raw = await asyncio.wait_for(read_all(reader), timeout)
    finally:
        writer.close()
    return parse(raw)


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Bytes until the server closes; a reset after a complete answer keeps what came."""
    chunks = []
    try:
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (TimeoutError if it does not)."""
    return await asyncio.wait_for(reader.read(), timeout)


async def read_response(reader: asyncio.StreamReader, timeout: float = 30.0) -> RawResponse:
    """One response with a Content-Length, leaving the connection open for the next."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    response = parse(head)
    assert response is not None
    length = int(response.headers.get("content-length", "0"))
    response.body = await asyncio.wait_for(reader.readexactly(length), timeout)
    return response
