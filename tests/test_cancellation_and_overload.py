"""A client that leaves stops the model; a full queue refuses work instead of queueing it."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from conftest import CHAT

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
