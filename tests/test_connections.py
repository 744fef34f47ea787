"""Idle, slow and too many connections are closed on time, and the agent keeps serving.

Timeouts here are 1 s; the bounds the tests allow are several times that, so a
loaded machine does not fail them.
"""

from __future__ import annotations

import asyncio
import json
import time

from conftest import EMBED
from rawhttp import parse, read_all, read_response

FAST = {"keepalive_timeout_s": 1.0, "header_timeout_s": 1.0, "body_timeout_s": 1.0}
EMBED_OK = {"model": EMBED, "input": "still serving"}


def port_of(agent) -> int:
    return int(agent.url.rsplit(":", 1)[1])


async def still_serving(agent) -> None:
    status, body, _ = await agent.post("/v1/embeddings", json=EMBED_OK)
    assert status == 200, body


async def test_idle_connections_are_closed_after_the_keepalive_timeout(make_agent):
    async with make_agent(models=(EMBED,), **FAST) as agent:
        started = time.monotonic()
        silent = [await asyncio.open_connection("127.0.0.1", port_of(agent)) for _ in range(20)]
        # and one that made a request and then stays idle on keep-alive
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(agent))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = await asyncio.wait_for(read_all(reader), 10)
        assert parse(raw).status == 200
        for r, _ in silent:
            assert await asyncio.wait_for(r.read(), 10) == b""  # closed by the agent, nothing sent
        assert time.monotonic() - started < 10
        for _, w in [*silent, (reader, writer)]:
            w.close()
        await still_serving(agent)


async def test_slowloris_headers_get_408_and_are_closed(make_agent):
    async with make_agent(models=(EMBED,), **FAST) as agent:
        async def slowloris() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(agent))
            writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")
            received = asyncio.ensure_future(read_all(reader))
            try:
                for i in range(100):  # one header line every 0.2 s, never the blank line
                    if received.done():
                        break
                    writer.write(f"X-Slow-{i}: y\r\n".encode())
                    await asyncio.sleep(0.2)
                return await asyncio.wait_for(received, 10)
            finally:
                writer.close()

        started = time.monotonic()
        answers = await asyncio.gather(*(slowloris() for _ in range(200)))
        assert time.monotonic() - started < 12
        for raw in answers:
            response = parse(raw)
            assert response is not None and response.status == 408
            assert response.json()["error"]["code"] == "request_timeout"
        await still_serving(agent)


async def test_a_body_that_trickles_gets_408_in_api_json(make_agent):
    async with make_agent(models=(EMBED,), **FAST) as agent:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(agent))
        writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\": ")
        started = time.monotonic()
        received = asyncio.ensure_future(read_all(reader))
        while not received.done() and time.monotonic() - started < 10:
            writer.write(b" ")
            await asyncio.sleep(0.2)
        response = parse(await asyncio.wait_for(received, 10))
        writer.close()
        assert response is not None and response.status == 408
        assert response.json()["error"]["code"] == "request_timeout"
        assert time.monotonic() - started < 10
        await still_serving(agent)


async def test_a_body_in_many_pieces_does_not_start_a_header_deadline(make_agent):
    """Body bytes are not a request's head: a keep-alive connection whose requests' bodies
    arrived in many pieces is still there for the next request after header_timeout_s
    (a timer armed by a body chunk once answered the next request with a 408)."""
    async with make_agent(models=(EMBED,), keepalive_timeout_s=10.0, header_timeout_s=1.0,
                          body_timeout_s=5.0) as agent:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(agent))
        # a small request padded to 2 MB: its body keeps arriving over many reads
        body = json.dumps({"model": EMBED, "input": "one piece after another"}).encode() + b" " * 2_000_000
        head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        writer.write(head + body)
        assert (await read_response(reader)).status == 200
        await asyncio.sleep(2.5)  # past header_timeout_s, well within keepalive_timeout_s
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        response = await read_response(reader)
        writer.close()
        assert response.status == 200, response.body


async def test_connections_past_the_cap_get_503_and_the_agent_recovers(make_agent):
    async with make_agent(models=(EMBED,), max_connections=30, keepalive_timeout_s=2.0) as agent:
        held = [await asyncio.open_connection("127.0.0.1", port_of(agent)) for _ in range(30)]
        extra = [await asyncio.open_connection("127.0.0.1", port_of(agent)) for _ in range(100)]
        for reader, _ in extra:
            response = parse(await asyncio.wait_for(read_all(reader), 10))
            assert response is not None and response.status == 503
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "too_many_connections"
        for _, writer in [*held, *extra]:
            writer.close()
        await asyncio.sleep(0.2)
        await still_serving(agent)
