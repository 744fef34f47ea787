"""Tool calls in the OpenAI form, through the unmodified `openai` client, against the demo chat
model (whose template knows no tools: the generic format of runtime/gguf/tool_calls.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from conftest import CHAT, openai_client
from schema_check import problems
from test_structured_output import gather_limited

# The `openai` client's tool-calling example (platform.openai.com, "Function calling").
WEATHER_TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get current temperature for a given location.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {
                    "type": "string",
                    "description": "City and country e.g. Bogotá, Colombia"
                }
            },
            "required": [
                "location"
            ],
            "additionalProperties": False
        },
        "strict": True
    }
}]

SHORT = {"type": "string", "minLength": 1, "maxLength": 32}


def function(name: str, description: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": sorted(properties),
        "additionalProperties": False}}}


# Strings carry maxLength: without it a small model may stay inside a string until max_tokens
# (valid so far, but cut); the bound lets every answer finish.
TOOLSETS = [
    [function("get_weather", "Get current temperature for a given location.", {"location": SHORT})],
    [function("set_light", "Switch a light.", {"room": {"type": "string", "enum": ["kitchen", "hall"]},
                                               "on": {"type": "boolean"}}),
     function("set_heating", "Set the heating.", {"degrees": {"type": "integer"}})],
    [function("search", "Search the web.", {"query": SHORT}),
     function("open_url", "Open a page.", {"url": SHORT})],
    [function("add", "Add two integers.", {"a": {"type": "integer"}, "b": {"type": "integer"}})],
    [function("send_email", "Send an email.", {"to": SHORT, "subject": SHORT, "urgent": {"type": "boolean"}}),
     function("create_event", "Put an event in the calendar.", {"title": SHORT, "day": {
         "type": "string", "enum": ["mon", "tue", "wed", "thu", "fri"]}})],
]
PROMPTS = [
    "What is the weather like in Paris today?",
    "Turn on the kitchen light.",
    "Find the latest news about edge computing.",
    "What is 12 plus 30?",
    "Email Alice that the meeting moved, it is urgent.",
    "Please help me with this.",
    "I am cold.",
    "Remind me about the dentist on Tuesday.",
    "Look up the price of apples.",
    "Do something useful.",
]


@pytest.fixture
async def client(agent) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai_client(agent.url) as opened:
        yield opened


def schemas(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {t["function"]["name"]: t["function"]["parameters"] for t in tools}


def check_calls(message: Any, tools: list[dict[str, Any]], only: str | None = None) -> None:
    assert message.tool_calls, message
    known = schemas(tools)
    for call in message.tool_calls:
        assert call.type == "function"
        assert call.id.startswith("call_")
        assert call.function.name in known and (only is None or call.function.name == only)
        arguments = json.loads(call.function.arguments)
        assert problems(arguments, known[call.function.name]) == [], (call.function.arguments,)


async def test_the_openai_tool_calling_example_runs_unmodified_and_its_arguments_parse(client):
    # the example as written (tool_choice left at auto), greedy so that it does not depend on a draw
    completion = await client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "What is the weather like in Paris today?"}],
        tools=WEATHER_TOOLS,
        temperature=0,
    )
    print(completion.choices[0].message.tool_calls)
    assert completion.choices[0].finish_reason == "tool_calls"
    check_calls(completion.choices[0].message, WEATHER_TOOLS, "get_weather")
    assert json.loads(completion.choices[0].message.tool_calls[0].function.arguments)["location"]


async def test_auto_answers_with_a_call_or_with_text_and_both_are_well_formed(client):
    replies = await gather_limited([client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": prompt}], tools=WEATHER_TOOLS, temperature=0,
        max_tokens=128) for prompt in ("What is the weather like in Paris today?", "Say hello.")])
    for reply in replies:
        message = reply.choices[0].message
        if reply.choices[0].finish_reason == "tool_calls":
            check_calls(message, WEATHER_TOOLS)
        else:
            assert reply.choices[0].finish_reason in ("stop", "length")
            assert message.tool_calls is None and isinstance(message.content, str)


async def test_required_and_named_tool_choice_always_give_valid_arguments_in_50_requests(client):
    cases = []
    for i in range(50):
        tools = TOOLSETS[i % len(TOOLSETS)]
        named = tools[-1]["function"]["name"] if i % 3 == 0 else None
        choice: Any = {"type": "function", "function": {"name": named}} if named else "required"
        sampling: dict[str, Any] = {"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "seed": 500 + i}
        cases.append((tools, named, client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": PROMPTS[i // len(TOOLSETS) % len(PROMPTS)]}],
            tools=tools, tool_choice=choice, parallel_tool_calls=i % 4 != 1, max_tokens=256, **sampling)))
    replies = await gather_limited([call for _, _, call in cases])
    for (tools, named, _), reply in zip(cases, replies, strict=True):
        assert reply.choices[0].finish_reason == "tool_calls", reply
        check_calls(reply.choices[0].message, tools, named)


async def test_parallel_tool_calls_false_gives_exactly_one_call(client):
    reply = await client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Turn on the kitchen light and set the heating to 21."}],
        tools=TOOLSETS[1], tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=128)
    assert len(reply.choices[0].message.tool_calls) == 1


async def test_a_streamed_tool_call_reassembles_to_the_unstreamed_call(client):
    args = dict(model=CHAT, messages=[{"role": "user", "content": PROMPTS[4]}], tools=TOOLSETS[4],
                tool_choice="required", temperature=0, max_tokens=256)
    whole = (await client.chat.completions.create(**args)).choices[0]
    stream = await client.chat.completions.create(**args, stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                if delta.id:
                    assert not call["id"], "the id comes once, first"
                    call["id"] = delta.id
                if delta.function and delta.function.name:
                    call["name"] = delta.function.name
                if delta.function and delta.function.arguments:
                    call["arguments"] += delta.function.arguments
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
    assert all(c["id"].startswith("call_") for c in calls.values())


async def test_a_tool_result_goes_back_to_the_model_in_the_next_request(client):
    messages: list[Any] = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    first = await client.chat.completions.create(model=CHAT, messages=messages, tools=WEATHER_TOOLS,
                                                 tool_choice="required", temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages.append(first.choices[0].message)  # as the OpenAI example does
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "14 degrees and sunny"})
    second = await client.chat.completions.create(model=CHAT, messages=messages, tools=WEATHER_TOOLS,
                                                  temperature=0, max_tokens=64)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    plain = await client.chat.completions.create(model=CHAT, messages=messages, temperature=0, max_tokens=32)
    assert plain.choices[0].message.content


async def test_tool_choice_none_answers_in_text(client):
    reply = await client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Say hello."}], tools=WEATHER_TOOLS, tool_choice="none",
        temperature=0, max_tokens=16)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content


# --- bad input -----------------------------------------------------------------------

HELLO = [{"role": "user", "content": "hi"}]


async def post_400(agent: Any, body: dict[str, Any]) -> dict[str, Any]:
    status, answer, _ = await agent.post("/v1/chat/completions", json={"model": CHAT, "max_tokens": 4, **body})
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"
    return answer["error"]


async def test_a_tool_message_with_an_unknown_id_is_a_400(agent):
    error = await post_400(agent, {"messages": [*HELLO, {"role": "tool", "tool_call_id": "call_nope",
                                                         "content": "12"}]})
    assert error["param"] == "messages.[1].tool_call_id" and "call_nope" in error["message"]


async def test_a_thousand_tools_is_a_400_naming_the_limit(agent):
    tools = [function(f"f{i}", "A function.", {"x": {"type": "integer"}}) for i in range(1000)]
    error = await post_400(agent, {"messages": HELLO, "tools": tools})
    assert error["param"] == "tools" and "at most 128" in error["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [function("f", "", {"x": {"$ref": "#"}})]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": WEATHER_TOOLS, "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
])
async def test_bad_tools_are_400s_naming_the_field_and_the_agent_keeps_serving(agent, body, param):
    error = await post_400(agent, {"messages": HELLO, **body})
    assert error["param"] == param
    status, answer, _ = await agent.post("/v1/chat/completions", json={
        "model": CHAT, "messages": HELLO, "max_tokens": 4, "temperature": 0})
    assert status == 200 and answer["choices"][0]["message"]["content"]
