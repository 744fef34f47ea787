"""Structured output through the unmodified `openai` client: response_format json_object and
json_schema (strict) against the demo chat model, in the batching engine (beside unconstrained
requests) and on the one-request-at-a-time path; schemas we refuse get OpenAI's 400."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import openai
import pytest
from conftest import CHAT, demo_config, openai_client, start_agent
from schema_check import problems

from runtime.scheduling.batching import BatchingSettings

NAME = {"type": "string", "minLength": 1, "maxLength": 24}

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer"}}, "required": ["name", "age"],
     "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]},
                                      "bright": {"type": "boolean"}}, "required": ["colour", "bright"],
     "additionalProperties": False},
    {"type": "object", "properties": {"city": NAME, "country": NAME, "population": {"type": "integer"}},
     "required": ["city", "country", "population"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                                      "confidence": {"type": "integer", "enum": [1, 2, 3, 4, 5]}},
     "required": ["sentiment", "confidence"], "additionalProperties": False},
    {"type": "object", "properties": {"title": NAME, "author": {"type": "object", "properties": {
        "first": NAME, "last": NAME}, "required": ["first", "last"], "additionalProperties": False},
        "year": {"type": "integer"}}, "required": ["title", "author", "year"], "additionalProperties": False},
    {"type": "object", "properties": {"command": {"type": "string", "enum": ["on", "off", "dim"]},
                                      "room": {"type": "string", "enum": ["kitchen", "bedroom", "hall"]},
                                      "level": {"type": "integer"}},
     "required": ["command", "room", "level"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"type": "boolean"}, "reason": NAME},
     "required": ["answer", "reason"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 4, "items": {
        "type": "object", "properties": {"name": NAME, "qty": {"type": "integer"}}, "required": ["name", "qty"],
        "additionalProperties": False}}}, "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"label": {"anyOf": [{"type": "string", "maxLength": 16}, {"type": "null"}]},
                                      "score": {"type": "integer"}},
     "required": ["label", "score"], "additionalProperties": False},
]
PROMPTS = [
    "Describe a person you know.",
    "Tell me about a place.",
    "Classify this review: the soup was cold and late.",
    "Turn off the lights in the kitchen please.",
    "Give me a shopping list for pancakes.",
]
JSON_PROMPTS = [
    "Return a JSON object with the keys name and age for a cat.",
    "Give me a JSON object with the keys city and country for Paris.",
    "Answer with a JSON object with the key result: what is 2 + 2?",
    "Return a JSON object with the key fruits holding three fruit names.",
    "Return a JSON object with the keys make and year for a car.",
    "Reply with a JSON object with the key greeting.",
    "Return a JSON object with the keys title and year for a book.",
    "Return a JSON object with the keys sky and temperature for today's weather.",
    "Return a JSON object with the keys user and age for Bob, aged 30.",
    "Give a JSON object with one key named ok set to true.",
]


#: Requests in flight at once: the batch's 8 slots and some queued, under the agent's
#: max_pending of 16 (more would get 429s).
IN_FLIGHT = 12


async def gather_limited(calls: list[Any]) -> list[Any]:
    """Await `calls` (coroutines) concurrently, at most IN_FLIGHT at once, results in order."""
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(call: Any) -> Any:
        async with gate:
            return await call

    return list(await asyncio.gather(*(one(c) for c in calls)))


@pytest.fixture
async def client(agent) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai_client(agent.url) as opened:
        yield opened


def schema_format(i: int, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": f"answer_{i}", "schema": schema, "strict": True}}


def settings(i: int) -> dict[str, Any]:
    """Greedy for even requests, seeded sampling for odd ones: varied, and repeatable."""
    return {"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "seed": 1000 + i}


async def schema_request(client: openai.AsyncOpenAI, i: int) -> tuple[dict[str, Any], Any]:
    schema = SCHEMAS[i % len(SCHEMAS)]
    reply = await client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": PROMPTS[i // len(SCHEMAS) % len(PROMPTS)]}],
        response_format=schema_format(i, schema), max_tokens=200, **settings(i))
    return schema, reply


def check_schema_reply(schema: dict[str, Any], reply: Any) -> None:
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    value = json.loads(choice.message.content)
    assert problems(value, schema) == [], (choice.message.content, schema)


async def test_json_schema_strict_answers_parse_and_match_in_50_varied_requests(client):
    replies = await gather_limited([schema_request(client, i) for i in range(50)])
    for schema, reply in replies:
        check_schema_reply(schema, reply)


async def test_json_object_answers_parse_in_50_varied_requests(client):
    async def one(i: int) -> Any:
        return await client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": JSON_PROMPTS[i % len(JSON_PROMPTS)]}],
            response_format={"type": "json_object"}, max_tokens=512, **settings(i // len(JSON_PROMPTS)))

    replies = await gather_limited([one(i) for i in range(50)])
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice
        assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.cpu_path
async def test_eight_constrained_beside_unconstrained_parse_and_leave_the_others_text_alone(client):
    plain = [{"role": "user", "content": f"Write one sentence about the number {n}."} for n in range(8)]
    alone = [await client.chat.completions.create(model=CHAT, messages=[m], max_tokens=32, temperature=0)
             for m in plain]
    constrained = [schema_request(client, i) for i in range(8)]
    unconstrained = [client.chat.completions.create(model=CHAT, messages=[m], max_tokens=32, temperature=0)
                     for m in plain]
    results = await asyncio.gather(*constrained, *unconstrained)
    for schema, reply in results[:8]:
        check_schema_reply(schema, reply)
    for want, got in zip(alone, results[8:], strict=True):
        assert got.choices[0].message.content == want.choices[0].message.content


async def test_greedy_constrained_answers_repeat(client):
    first = [(await schema_request(client, i))[1].choices[0].message.content for i in (0, 2, 4)]
    again = await asyncio.gather(*(schema_request(client, i) for i in (0, 2, 4)))
    assert [reply.choices[0].message.content for _, reply in again] == first


async def test_a_grammar_that_cannot_finish_within_max_tokens_ends_with_length(client):
    reply = await client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0, max_tokens=3,
        response_format=schema_format(0, SCHEMAS[5]))
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


async def test_streamed_json_schema_answer_is_the_unstreamed_one(client):
    args = dict(model=CHAT, messages=[{"role": "user", "content": PROMPTS[1]}], temperature=0, max_tokens=200,
                response_format=schema_format(2, SCHEMAS[2]))
    whole = await client.chat.completions.create(**args)
    stream = await client.chat.completions.create(**args, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == whole.choices[0].message.content
    check_schema_reply(SCHEMAS[2], whole)


async def test_one_request_at_a_time_path_constrains_and_gives_logprobs_too(state_dir):
    config = demo_config(state_dir, (CHAT,))
    async with (start_agent(replace(config, batching=BatchingSettings(gguf_slots=1))) as single,
                openai_client(single.url) as client):
        for i in range(6):
            schema, reply = await schema_request(client, i)
            check_schema_reply(schema, reply)
        reply = await client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": JSON_PROMPTS[0]}], temperature=0, max_tokens=256,
            response_format={"type": "json_object"})
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
        reply = await client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0, max_tokens=8,
            logprobs=True, top_logprobs=3)
        content = reply.choices[0].logprobs.content
        assert len(content) == reply.usage.completion_tokens
        assert all(entry.token == entry.top_logprobs[0].token for entry in content)


# --- schemas we refuse -------------------------------------------------------------


def deep(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
    return schema


BAD_SCHEMAS = {
    "huge": ({"type": "object", "properties": {f"field_{i}_{'x' * 40}": {"type": "string"} for i in range(2000)}},
             "bytes"),
    "many properties": ({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1500)}},
                        "properties"),
    "deep": (deep(40), "nested"),
    "recursive": ({"type": "object", "properties": {"child": {"$ref": "#"}}}, "recursive"),
    "ref loop": ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"type": "object", "properties": {
        "a": {"$ref": "#/$defs/a"}}}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}}, "recursive"),
    "dangling ref": ({"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}, "does not resolve"),
    "unknown type": ({"type": "object", "properties": {"x": {"type": "decimal"}}}, "cannot be turned into a grammar"),
}


@pytest.mark.parametrize("case", sorted(BAD_SCHEMAS))
async def test_a_schema_we_cannot_take_is_a_400_naming_it_and_the_agent_keeps_serving(agent, case):
    schema, words = BAD_SCHEMAS[case]
    status, body, _ = await agent.post("/v1/chat/completions", json={
        "model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "response_format": schema_format(0, schema)})
    assert status == 400, body
    error = body["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "response_format.json_schema.schema"
    assert words in error["message"]
    status, body, _ = await agent.post("/v1/chat/completions", json={
        "model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0})
    assert status == 200 and body["choices"][0]["message"]["content"]


async def test_response_format_of_an_unknown_type_is_a_400(agent):
    status, body, _ = await agent.post("/v1/chat/completions", json={
        "model": CHAT, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "yaml"}})
    assert status == 400 and body["error"]["param"] == "response_format.type"
