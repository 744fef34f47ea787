"""Tool calls for models whose chat template does not know tools: the generic format.

It is llama.cpp's "generic" tool-call format (common/chat.cpp), which llama-server uses
for templates without tool support. A system message lists the tools (name, description,
JSON schema of the parameters) and asks the model to answer with one JSON object:

    {"tool_calls": [{"name": "get_weather", "arguments": {"location": "Paris"}}]}

to call tools, or ``{"response": "..."}`` to answer in text. Decoding is constrained by a
grammar built from the tools' parameter schemas (runtime/gguf/grammar.py), so the object always
parses and the arguments always match their schema:

- ``tool_choice: "auto"``: either form; ``"required"``: a call; a named function: a call of
  that function only; ``"none"``: the tools are not shown and the answer is free text.
- ``parallel_tool_calls: false``: exactly one call; otherwise one to MAX_PARALLEL_CALLS.

Earlier turns come back to the model in the same format: an assistant message's
``tool_calls`` as the JSON object above, a ``tool`` message as a user message holding
``{"tool_response": {"tool_call_id", "name", "content"}}`` (llama.cpp's polyfill for
templates without a tool role).

A model whose own template knows tools uses its own format instead (runtime/gguf/chat_formats.py):
the request carries a `ToolRequest` (the tools, the choice and the chat as the template reads
it) beside the generic rendering, and the backend picks the one its template needs.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from runtime.gguf.grammar import SchemaError, schema_rules

#: Functions in one request's `tools` (OpenAI allows 128).
MAX_TOOLS = 128
#: Calls in one answer when parallel_tool_calls is on: small models repeat a call until
#: max_tokens cuts it otherwise.
MAX_PARALLEL_CALLS = 4
#: OpenAI's rule for function names.
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

PREAMBLE = (
    "You have these tools (the parameters of each are a JSON schema):\n{tools}\n\n"
    "{ask}"
)
ASK = {
    "auto": ('Answer with one JSON object: {{"tool_calls": [{{"name": <tool name>, "arguments": '
             '{{...}}}}]}} to call {some}, or {{"response": <your answer as a string>}} to answer '
             "the user directly."),
    "required": ('Call {some} now. Answer with one JSON object: {{"tool_calls": [{{"name": '
                 '<tool name>, "arguments": {{...}}}}]}}.'),
}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolRequest:
    """A chat's tools as a model's own template takes them (runtime/gguf/chat_formats.py)."""

    tools: tuple[Tool, ...]
    #: "auto", "required", "none" or "function" (then `named` is the function)
    choice: str
    named: str | None
    parallel: bool
    #: the messages as chat templates read them: OpenAI's, with each call's arguments as an
    #: object (templates write them with `tojson`) and tool results in the `tool` role
    messages: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class ToolPlan:
    """What a request with tools adds: the system text and the grammar (None: free text)."""

    system: str | None
    grammar: str | None


def _literal(text: str) -> str:
    return json.dumps(json.dumps(text))  # a GBNF literal of the JSON string `"text"`


def call_rule(index: int, tool: Tool, param: str, key: str = "arguments") -> tuple[str, str]:
    """The rules for one call of `tool`, ``{"name": ..., key: {...}}``: (rule name, GBNF)."""
    name = f"call{index}"
    args = schema_rules(tool.parameters, f"{param}[{index}].function.parameters", f"{name}-args")
    rule = (f'{name} ::= "{{" space "\\"name\\"" space ":" space {_literal(tool.name)} space "," '
            f'space {_literal(key)} space ":" space {name}-args "}}" space')
    return name, f"{rule}\n{args}"


def plan(tools: list[Tool], choice: str, named: str | None, parallel: bool, param: str = "tools") -> ToolPlan:
    """The system text and grammar for `tools` under tool_choice `choice` ("auto",
    "required", "none", or "function" with `named`)."""
    if choice == "none" or not tools:
        return ToolPlan(None, None)
    shown = [t for t in tools if named is None or t.name == named]
    listing = "\n".join(json.dumps({"name": t.name, "description": t.description,
                                    "parameters": t.parameters}) for t in shown)
    some = f"the tool {named}" if named else ("one or more tools" if parallel else "one tool")
    ask = ASK["auto" if choice == "auto" else "required"].format(some=some)
    rules = []
    names = []
    for i, tool in enumerate(tools):
        if tool in shown:
            rule_name, text = call_rule(i, tool, param)
            names.append(rule_name)
            rules.append(text)
    calls = f'call ::= {" | ".join(names)}'
    more = f' ("," space call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
    top = [
        calls,
        f'calls ::= "{{" space "\\"tool_calls\\"" space ":" space "[" space call{more} "]" space "}}" space',
        'space ::= " "?',
    ]
    if choice == "auto":
        top += [
            'root ::= calls | response',
            'response ::= "{" space "\\"response\\"" space ":" space text "}" space',
            'text ::= "\\"" ([^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4}))* "\\"" space',
        ]
    else:
        top.append("root ::= calls")
    return ToolPlan(PREAMBLE.format(tools=listing, ask=ask), "\n".join(top + rules))


def parse_tools(raw: Any, param: str = "tools") -> list[Tool]:
    """OpenAI's `tools` array, checked (type, name, schema limits)."""
    if not isinstance(raw, list):
        raise SchemaError("tools must be an array of {\"type\": \"function\", \"function\": {...}}", param)
    if len(raw) > MAX_TOOLS:
        raise SchemaError(f"tools takes at most {MAX_TOOLS} functions, got {len(raw)}", param)
    tools: list[Tool] = []
    seen = set()
    for i, item in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(item, dict) or item.get("type") != "function" or not isinstance(item.get("function"), dict):
            raise SchemaError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}", where)
        function = item["function"]
        name = function.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise SchemaError(f"{where}.function.name must be 1 to 64 letters, digits, _ or -",
                              f"{where}.function.name")
        if name in seen:
            raise SchemaError(f"two tools are named {name!r}", f"{where}.function.name")
        seen.add(name)
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise SchemaError(f"{where}.function.description must be a string", f"{where}.function.description")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise SchemaError(f"{where}.function.parameters must be a JSON schema object",
                              f"{where}.function.parameters")
        tools.append(Tool(name, description, parameters))
    return tools


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def read_answer(text: str, fmt: str = "generic") -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) of an answer in tool format `fmt` (the model's `ModelInfo.tool_format`):
    calls as OpenAI `tool_calls` entries. Text that is not the format (cut by max_tokens, or
    tool_choice none) is content."""
    if fmt != "generic":
        from runtime.gguf.chat_formats import read_native

        return read_native(text, fmt)
    try:
        answer = json.loads(text)
    except ValueError:
        return text, []
    if isinstance(answer, dict) and isinstance(answer.get("tool_calls"), list):
        calls = [{"id": new_call_id(), "type": "function",
                  "function": {"name": call.get("name"), "arguments": json.dumps(call.get("arguments", {}))}}
                 for call in answer["tool_calls"] if isinstance(call, dict)]
        return None, calls
    if isinstance(answer, dict) and isinstance(answer.get("response"), str):
        return answer["response"], []
    return text, []


def render_calls(calls: list[dict[str, Any]]) -> str:
    """An assistant message's `tool_calls` as the model wrote them (for the next turn)."""
    out = []
    for call in calls:
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            arguments = function.get("arguments")
        out.append({"name": function.get("name"), "arguments": arguments})
    return json.dumps({"tool_calls": out})


def render_result(call_id: str, name: str | None, content: str) -> str:
    """A tool message's content as the next turn shows it."""
    return json.dumps({"tool_response": {"tool_call_id": call_id, "name": name, "content": content}})


def template_call(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI `tool_calls` entry as chat templates read it: arguments as an object."""
    function = call.get("function") or {}
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except ValueError:
        arguments = function.get("arguments")
    return {"id": call.get("id"), "type": "function",
            "function": {"name": function.get("name"), "arguments": arguments}}
