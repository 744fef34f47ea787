"""Log probabilities through the unmodified `openai` client: chat's logprobs / top_logprobs and
the legacy completions form, streamed or not, batched or alone."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import openai
import pytest
from conftest import CHAT, openai_client

ARGS = dict(model=CHAT, messages=[{"role": "user", "content": "Name three animals."}], max_tokens=16,
            temperature=0, logprobs=True, top_logprobs=5)


@pytest.fixture
async def client(agent) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai_client(agent.url) as opened:
        yield opened


async def test_greedy_tokens_are_the_most_likely_of_their_top_logprobs(client):
    reply = await client.chat.completions.create(**ARGS)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 5
        best = entry.top_logprobs[0]
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-6)
        assert best.token == entry.token and bytes(entry.bytes) == entry.token.encode()
        assert entry.logprob <= 0
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                  reverse=True)


async def test_streamed_logprobs_are_the_unstreamed_ones(client):
    whole = await client.chat.completions.create(**ARGS)
    stream = await client.chat.completions.create(**ARGS, stream=True)
    entries = []
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.content:
                entries += choice.logprobs.content
    want = whole.choices[0].logprobs.content
    assert [e.token for e in entries] == [e.token for e in want]
    assert math.fsum(e.logprob for e in entries) == pytest.approx(math.fsum(e.logprob for e in want), abs=1e-4)


async def test_logprobs_in_a_batch_equal_those_alone(client):
    alone = await client.chat.completions.create(**ARGS)
    others = [client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": f"Count to {n}."}], max_tokens=24, temperature=0)
        for n in range(7)]
    batched, *_ = await asyncio.gather(client.chat.completions.create(**ARGS), *others)
    want, got = alone.choices[0].logprobs.content, batched.choices[0].logprobs.content
    assert [e.token for e in got] == [e.token for e in want]
    for a, b in zip(got, want, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)


async def test_without_logprobs_the_field_is_null(client):
    reply = await client.chat.completions.create(model=CHAT, messages=ARGS["messages"], max_tokens=4, temperature=0)
    assert reply.choices[0].logprobs is None


async def test_completions_give_the_legacy_logprobs_form(client):
    reply = await client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=8, temperature=0,
                                            logprobs=3)
    logprobs = reply.choices[0].logprobs
    n = reply.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == n
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(n)]
    for token, lp, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) == 3 and top[token] == pytest.approx(lp) and lp == pytest.approx(max(top.values()))


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
])
async def test_out_of_range_logprobs_are_400s(agent, path, body, param):
    status, answer, _ = await agent.post(path, json={"model": CHAT, "max_tokens": 2, **body})
    assert status == 400 and answer["error"]["param"] == param
