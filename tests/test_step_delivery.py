"""How a batch step's tokens reach the clients: one loop wake-up per step, one write per stream.

The model thread hands every stream's new tokens of a step to the event loop in one
`call_soon_threadsafe`, not one per token per stream; a streamed response writes what the
loop found for it in one socket write, still one SSE event per token delta (OpenAI's
convention: clients expect a chunk per delta). The text must be the same as before: the
non-streamed answer, token for token. Real agent in this process, real model, real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp_sse
import pytest
from conftest import CHAT, Executions, RunningAgent, demo_config, start_agent

from agent.context import MODELS

pytestmark = pytest.mark.slow

#: SmolLM2's end-of-generation tokens, banned so every answer runs to max_tokens.
NO_EOG = {"logit_bias": {"0": -100, "2": -100, "4": -100}}
QUESTIONS = ["Name three colours.", "Write a haiku about a lighthouse.", "What does a heat pump do?",
             "Describe a harbor at dawn."]


@pytest.fixture(scope="module")
async def chat_agent(state_dir: Path) -> AsyncIterator[RunningAgent]:
    async with start_agent(demo_config(state_dir, (CHAT,))) as running:
        yield running


def body(question: str, tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": CHAT, "messages": [{"role": "user", "content": question}], "max_tokens": tokens,
            "temperature": 0, "stream": stream, **NO_EOG,
            **({"stream_options": {"include_usage": True}} if stream else {})}


async def answer_alone(agent: RunningAgent, question: str, tokens: int) -> str:
    status, reply, _ = await agent.post("/v1/chat/completions", json=body(question, tokens, False))
    assert status == 200, reply
    return str(reply["choices"][0]["message"]["content"])


class Streamed:
    """One streamed chat: its SSE events' JSON, and an optional `hold` of the whole loop after
    the first piece (as a loop busy elsewhere would be), so that several steps' tokens wait."""

    def __init__(self) -> None:
        self.chunks: list[dict[str, Any]] = []
        self.done = False

    @property
    def deltas(self) -> list[str]:
        return [c["choices"][0]["delta"]["content"] for c in self.chunks
                if c["choices"] and c["choices"][0]["delta"].get("content")]

    @property
    def usage(self) -> dict[str, int]:
        return next(c["usage"] for c in self.chunks if c.get("usage"))

    async def run(self, agent: RunningAgent, question: str, tokens: int,
                  hold: Callable[[], None] | None = None) -> Streamed:
        async with aiohttp.ClientSession() as session, session.post(
                agent.url + "/v1/chat/completions", json=body(question, tokens, True)) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line == b"data: [DONE]\n":
                    self.done = True
                elif line.startswith(b"data: "):
                    self.chunks.append(json.loads(line[6:]))
                    if hold is not None and self.deltas:
                        hold()  # blocks the loop: the model thread goes on generating
                        hold = None
        return self


async def test_a_step_wakes_the_event_loop_once_for_all_its_streams(chat_agent, monkeypatch):
    loop = asyncio.get_running_loop()
    wakeups = []
    original = loop.call_soon_threadsafe

    def counted(callback: Any, *args: Any, context: Any = None) -> Any:
        if threading.current_thread().name.startswith("model:"):
            wakeups.append(callback)
        return original(callback, *args, context=context)

    alone = [await answer_alone(chat_agent, q, 32) for q in QUESTIONS]
    monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
    async with Executions(chat_agent, CHAT) as decodes:
        streams = await asyncio.gather(*(Streamed().run(chat_agent, q, 32) for q in QUESTIONS))
    monkeypatch.undo()
    assert ["".join(s.deltas) for s in streams] == alone  # the same text as alone, not streamed
    assert all(s.done and s.usage["completion_tokens"] == 32 for s in streams)
    # one per step (a decode call, or a step that only read prompts and gave first tokens);
    # per token per stream it was about 4 x 32
    assert len(wakeups) <= decodes.executions + len(QUESTIONS), (len(wakeups), decodes.executions)


async def test_tokens_waiting_for_a_busy_loop_leave_in_one_write_one_event_per_token(chat_agent, monkeypatch):
    writes: dict[int, int] = {}
    original = aiohttp_sse.EventSourceResponse.write

    async def counted(self: Any, data: bytes) -> None:
        writes[id(self)] = writes.get(id(self), 0) + 1
        await original(self, data)

    want = await answer_alone(chat_agent, QUESTIONS[1], 48)
    scheduler = chat_agent.app[MODELS].get(CHAT).scheduler

    def until_generated() -> None:
        """Hold the loop until the model thread has finished the answer (the queue depth of
        /metrics, read off the loop): every token is then waiting for the loop."""
        deadline = time.monotonic() + 300
        while scheduler.depth and time.monotonic() < deadline:
            time.sleep(0.01)

    monkeypatch.setattr(aiohttp_sse.EventSourceResponse, "write", counted)
    got = await Streamed().run(chat_agent, QUESTIONS[1], 48, hold=until_generated)
    monkeypatch.undo()
    assert "".join(got.deltas) == want and got.done
    # OpenAI's convention is kept: one event per token delta, never merged deltas
    assert len(got.deltas) == got.usage["completion_tokens"] == 48
    # role + first token, then the 47 tokens that waited, then finish + usage + [DONE]: one
    # write each (one per event was 48 + 4)
    assert list(writes.values()) == [3]
