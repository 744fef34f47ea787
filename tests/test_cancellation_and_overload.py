"""A client that leaves stops the model; a full queue refuses work instead of queueing it."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import pytest
from conftest import CHAT
from rawhttp import read_all

from agent.config import ServerConfig

EOS = 2  # SmolLM2's <|im_end|>; banned so that generation only stops at max_tokens
LONG = {"model": CHAT, "prompt": "Write a long story about the sea.", "max_tokens": 1500,
        "temperature": 0.8, "logit_bias": {str(EOS): -100}}


async def wait_for(predicate, timeout=20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_client_disconnect_mid_stream_stops_generation(make_agent):
    async with make_agent(models=(CHAT,)) as agent:
        received = 0
        async with (aiohttp.ClientSession() as session,
                    session.post(agent.url + "/v1/completions", json={**LONG, "stream": True}) as resp):
            assert resp.status == 200
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    received += 1
                if received == 5:
                    break  # leave: the session closes the connection
        assert received == 5

        async def stopped() -> bool:
            return await agent.metric("edgefleet_scheduler_cancelled_total", model=CHAT) == 1

        await wait_for(stopped)
        generated = await agent.metric("edgefleet_generated_tokens_total", model=CHAT)
        assert 5 <= generated < 200, f"the backend went on to {generated} tokens of 1500"
        assert await agent.metric("edgefleet_queue_depth", model=CHAT) == 0
        # and the model serves the next request normally
        status, body, _ = await agent.post("/v1/completions", json={**LONG, "max_tokens": 4})
        assert status == 200 and body["usage"]["completion_tokens"] == 4


async def test_client_disconnect_of_an_unstreamed_request_stops_generation(make_agent):
    async with make_agent(models=(CHAT,)) as agent:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.post(agent.url + "/v1/completions", json=LONG,
                                        timeout=aiohttp.ClientTimeout(total=1.0)):
                    pass
            except TimeoutError:
                pass

        async def stopped() -> bool:
            return await agent.metric("edgefleet_scheduler_cancelled_total", model=CHAT) == 1

        await wait_for(stopped)
        assert await agent.metric("edgefleet_generated_tokens_total", model=CHAT) < 1000


async def test_overload_is_refused_with_retry_after_and_admitted_requests_finish(make_agent):
    async with make_agent(models=(CHAT,), max_pending=2) as agent:
        body = {**LONG, "max_tokens": 40}

        async def one():
            async with agent.http.post(agent.url + "/v1/completions", json=body) as resp:
                return resp.status, await resp.json(), resp.headers.get("Retry-After")

        results = await asyncio.gather(*(one() for _ in range(8)))
        statuses = sorted(status for status, _, _ in results)
        assert statuses.count(200) == 2, statuses
        assert statuses.count(429) == 6, statuses
        for status, payload, retry_after in results:
            if status == 429:
                assert int(retry_after) >= 1
                assert payload["error"]["type"] == "rate_limit_error"
                assert payload["error"]["code"] == "queue_full"
            else:
                assert payload["usage"]["completion_tokens"] == 40
        assert await agent.metric("edgefleet_scheduler_rejected_total", model=CHAT) == 6
        # the queue drained: a new request is admitted again
        status, _, _ = await agent.post("/v1/completions", json={**body, "max_tokens": 2})
        assert status == 200


async def test_stream_ends_with_done_and_carries_sse_headers(agent):
    async with agent.http.post(agent.url + "/v1/chat/completions", json={
        "model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True,
    }) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = [line.decode().strip() async for line in resp.content if line.strip()]
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][len("data: "):])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"


async def stalled_stream(port: int, body: dict) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A streamed request whose client reads the response's first bytes and then nothing: a
    small receive buffer, and the transport's reading paused, so the kernel's window closes."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window it offers
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    data = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    head = await asyncio.wait_for(reader.readuntil(b"data: "), 60)
    writer.transport.pause_reading()  # from here on the client reads nothing
    return reader, writer, head


async def test_streams_whose_clients_stop_reading_are_ended_and_their_slots_freed(make_agent):
    """Two streams fill both slots and their clients stop reading: newcomers get 429 until the
    agent's writes have found the clients' buffers full for server.write_timeout_s; then both
    streams are ended (cancelled, not run to their 1500 tokens) and a newcomer gets a 200."""
    async with make_agent(models=(CHAT,), max_pending=2, write_timeout_s=1.0) as agent:
        port = int(agent.url.rsplit(":", 1)[1])
        stalled = [await stalled_stream(port, {**LONG, "stream": True}) for _ in range(2)]
        assert all(head.startswith(b"HTTP/1.1 200") for _, _, head in stalled), stalled
        status, _, headers = await agent.post("/v1/completions", json={**LONG, "max_tokens": 2})
        assert status == 429 and int(headers["Retry-After"]) >= 1

        async def both_ended() -> bool:
            return await agent.metric("edgefleet_scheduler_cancelled_total", model=CHAT) == 2

        await wait_for(both_ended, timeout=300)  # generous: the buffers fill at the model's pace
        assert await agent.metric("edgefleet_queue_depth", model=CHAT) == 0
        assert await agent.metric("edgefleet_scheduler_completed_total", model=CHAT) == 0
        generated = await agent.metric("edgefleet_generated_tokens_total", model=CHAT)
        assert generated < 2 * LONG["max_tokens"], generated
        status, body, _ = await agent.post("/v1/completions", json={**LONG, "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] == 2
        for reader, writer, _ in stalled:  # the agent closed them: what is left ends without [DONE]
            writer.transport.resume_reading()
            rest = await asyncio.wait_for(read_all(reader), 30)
            assert b"[DONE]" not in rest
            writer.close()


def test_write_timeout_must_be_positive():
    with pytest.raises(ValueError, match="write_timeout_s"):
        ServerConfig(write_timeout_s=0)
