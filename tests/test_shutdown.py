"""SIGTERM keeps to server.drain_timeout_s: a stream that cannot finish ends properly
(final chunk saying why, then [DONE]), queued requests get 503 + Retry-After in the
API's JSON, and the process exits 0 within the deadline."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from agent_process import serve
from conftest import CHAT

DRAIN_S = 4.0
EOS = 2  # banned so that generation could only end at max_tokens, far past the deadline
ENDLESS = {"model": CHAT, "prompt": "Write a long story about the sea.", "max_tokens": 1800,
           "temperature": 0.8, "logit_bias": {str(EOS): -100}}


async def test_sigterm_ends_streams_with_a_reason_refuses_queued_and_exits_0_in_time(state_dir, tmp_path):
    # Two batching slots, both taken by endless streams: the three chats after them queue.
    with serve(state_dir, tmp_path, server__drain_timeout_s=DRAIN_S, batching__gguf_slots=2) as agent:
        async with aiohttp.ClientSession() as http:
            streams = []
            for _ in range(2):
                stream = await http.post(agent.url + "/v1/completions", json={**ENDLESS, "stream": True})
                assert stream.status == 200
                first = await stream.content.readline()
                assert first.startswith(b"data: {")
                streams.append((stream, first))

            async def queued() -> tuple[int, dict, str | None]:
                async with http.post(agent.url + "/v1/chat/completions", json={
                    "model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                }) as resp:
                    return resp.status, await resp.json(), resp.headers.get("Retry-After")

            waiting = [asyncio.ensure_future(queued()) for _ in range(3)]
            await asyncio.sleep(0.5)  # they are admitted and wait behind the streams
            exit_task = asyncio.ensure_future(asyncio.to_thread(agent.terminate))

            for stream, first in streams:
                rest = await asyncio.wait_for(stream.content.read(), DRAIN_S + 10)  # to the chunked end
                events = [line for line in (first + rest).decode().splitlines() if line.startswith("data: ")]
                assert events[-1] == "data: [DONE]"
                last = json.loads(events[-2][len("data: "):])
                assert last["choices"][0]["finish_reason"] == "shutdown"
                assert len(events) > 3  # it was really streaming before it was stopped

            for status, body, retry_after in await asyncio.gather(*waiting):
                assert status == 503, body
                assert body["error"]["code"] == "shutting_down"
                assert body["error"]["type"] == "unavailable_error"
                assert int(retry_after) >= 1

            code, took = await exit_task
    assert code == 0, agent.log()
    print(f"SIGTERM to exit: {took:.2f}s with a {DRAIN_S}s drain")
    assert took < DRAIN_S + 3, f"exit took {took:.1f}s for a {DRAIN_S}s drain"
    log = agent.log()
    assert "Traceback" not in log and "stopped" in log


async def test_sigterm_with_nothing_running_exits_at_once(state_dir, tmp_path):
    with serve(state_dir, tmp_path, server__drain_timeout_s=30) as agent:
        code, took = agent.terminate()
    assert code == 0 and took < 10, agent.log()
