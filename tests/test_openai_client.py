"""The official `openai` client, unmodified, pointed at the agent."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import openai
import pytest
from conftest import CHAT, EMBED, openai_client


@pytest.fixture
async def client(agent) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai_client(agent.url) as opened:
        yield opened


async def test_model_listing_shows_both_demo_models(client):
    models = await client.models.list()
    assert {m.id for m in models.data} == {CHAT, EMBED}
    assert (await client.models.retrieve(CHAT)).id == CHAT


async def test_chat_completion_answers_with_text_and_usage(client):
    reply = await client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5
    assert 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


@pytest.mark.cpu_path
async def test_streamed_chat_gives_the_same_text_as_unstreamed(client):
    args = dict(model=CHAT, messages=[{"role": "user", "content": "Name a colour."}],
                max_tokens=16, temperature=0)
    whole = await client.chat.completions.create(**args)
    stream = await client.chat.completions.create(
        **args, stream=True, stream_options={"include_usage": True}
    )
    pieces, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


async def test_text_completion_honours_max_tokens(client):
    reply = await client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=8,
                                            temperature=0, logit_bias={"2": -100})
    assert reply.choices[0].text
    assert reply.usage.completion_tokens <= 8


async def test_stop_sequence_ends_the_text_before_it(client):
    free = await client.completions.create(model=CHAT, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = free.choices[0].text
    assert "," in text, text
    stop_at = text[text.index(","):][:1]
    stopped = await client.completions.create(
        model=CHAT, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop_at]
    )
    assert stopped.choices[0].text == text[: text.index(",")]
    assert stopped.choices[0].finish_reason == "stop"


async def test_seeded_sampling_repeats(client):
    args = dict(model=CHAT, messages=[{"role": "user", "content": "Tell me a word."}],
                max_tokens=10, temperature=1.2, top_p=0.95, seed=1234)
    first = await client.chat.completions.create(**args)
    second = await client.chat.completions.create(**args)
    assert first.choices[0].message.content == second.choices[0].message.content


async def test_embeddings_through_the_client_are_unit_vectors(client):
    result = await client.embeddings.create(model=EMBED, input=["a cat", "a dog"])
    assert [d.index for d in result.data] == [0, 1]
    for item in result.data:
        assert len(item.embedding) == 384
        assert math.isclose(math.sqrt(sum(x * x for x in item.embedding)), 1.0, rel_tol=1e-5)
    assert result.usage.prompt_tokens > 0


async def test_embeddings_as_floats_and_base64_agree(client):
    as_float = await client.embeddings.create(model=EMBED, input="hello", encoding_format="float")
    as_b64 = await client.embeddings.create(model=EMBED, input="hello")  # the client asks base64
    assert as_float.data[0].embedding == pytest.approx(as_b64.data[0].embedding, abs=1e-7)
