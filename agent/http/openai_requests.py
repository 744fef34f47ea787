"""Validate OpenAI request bodies into runtime requests.

Each check names the offending field in `param`, as OpenAI does, so a client
sees ``{"param": "temperature", "message": "temperature must be between 0 and
2"}`` rather than a failure deep in llama.cpp. Unknown fields are ignored, as
OpenAI-compatible servers do; fields we cannot honour (n > 1, images, audio) are
refused rather than silently dropped.

Structured output (`response_format` json_object / json_schema) and tools become a
grammar on the request (runtime/gguf/grammar.py, runtime/gguf/tool_calls.py: the generic tool
format); a schema or tool list past the limits there is a 400 naming the field, before
anything is queued. A chat with tools also carries them and its messages in OpenAI's terms
(`GenerationRequest.tools`), for a model whose own template knows tools
(runtime/gguf/chat_formats.py): which of the two the model reads is the model's choice.
Tool-role messages must answer a call made by an earlier assistant
message of the same request (`tool_call_id`), as OpenAI requires.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.http.errors import bad_request
from runtime.backend import ChatMessage, GenerationRequest
from runtime.gguf import tool_calls
from runtime.gguf.grammar import SchemaError, json_object_grammar, schema_rules

MAX_STOP_SEQUENCES = 4
#: OpenAI's ceiling for top_logprobs.
MAX_TOP_LOGPROBS = 20
ROLES = ("system", "user", "assistant", "developer", "tool")


@dataclass(frozen=True)
class ParsedGeneration:
    model: str
    stream: bool
    include_usage: bool
    request: GenerationRequest
    #: the answer is in the generic tool format (runtime/gguf/tool_calls.py): read it as calls or text
    tools: bool = False


@dataclass(frozen=True)
class ParsedEmbedding:
    model: str
    texts: list[str]
    encoding_format: str
    dimensions: int | None


def require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter", param="model")
    return model


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"{key} must be a number", param=key)
    if not low <= value <= high:
        raise bad_request(f"{key} must be between {low:g} and {high:g}, got {value}", param=key)
    return float(value)


def _optional_int(body: dict[str, Any], key: str, low: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{key} must be an integer", param=key)
    if value < low:
        raise bad_request(f"{key} must be at least {low}, got {value}", param=key)
    return value


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("stop must be a non-empty string or a list of them", param="stop")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise bad_request(f"stop takes at most {MAX_STOP_SEQUENCES} sequences", param="stop")
    return stop


def _logit_bias(body: dict[str, Any]) -> dict[int, float]:
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise bad_request("logit_bias must be an object of token id -> bias", param="logit_bias")
    parsed: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            token = -1
        if token < 0:  # the model checks the upper end against its vocabulary
            raise bad_request(f"logit_bias key {key!r} is not a token id", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise bad_request("logit_bias values must be numbers from -100 to 100", param="logit_bias")
        parsed[token] = float(value)
    return parsed


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("stream must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", param="stream_options")
    return stream, bool(options.get("include_usage", False))


def _refuse_what_we_cannot_honour(body: dict[str, Any]) -> None:
    n = body.get("n", 1)
    if n not in (1, None):
        raise bad_request("only n=1 is supported", param="n")


def _response_format(body: dict[str, Any]) -> str | None:
    """The grammar for `response_format` (None: free text)."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad_request("response_format must be an object", param="response_format")
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_grammar()
    if kind != "json_schema":
        raise bad_request("response_format.type must be text, json_object or json_schema",
                          param="response_format.type")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise bad_request("response_format.json_schema must be an object with a schema",
                          param="response_format.json_schema")
    schema = spec.get("schema") or {"type": "object"}  # OpenAI: no schema means any object
    try:
        return schema_rules(schema, "response_format.json_schema.schema")
    except SchemaError as exc:
        raise bad_request(str(exc), param=exc.param) from None


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise bad_request("logprobs must be a boolean", param="logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise bad_request(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}",
                              param="top_logprobs")
        if not wanted:
            raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
    return (top or 0) if wanted else None


def _completion_logprobs(body: dict[str, Any]) -> int | None:
    wanted = body.get("logprobs")
    if wanted is None or wanted is False:
        return None
    if isinstance(wanted, bool) or not isinstance(wanted, int) or not 0 <= wanted <= MAX_TOP_LOGPROBS:
        raise bad_request(f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}", param="logprobs")
    return wanted


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    _refuse_what_we_cannot_honour(body)
    max_tokens = _optional_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens", 1)
    return {
        "max_tokens": max_tokens,
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
        "presence_penalty": _number(body, "presence_penalty", 0.0, -2.0, 2.0),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        "seed": _optional_int(body, "seed", -(2**63)),
        "stop": _stop(body),
        "logit_bias": _logit_bias(body),
    }


def _content(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(
                    "only text content parts are supported", param=f"messages.[{index}].content"
                )
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request("message content must be a string or a list of text parts",
                      param=f"messages.[{index}].content")


def parse_chat(body: Any) -> ParsedGeneration:
    body = require_object(body)
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty array", param="messages")
    parsed, template_messages = _messages(messages)
    if body.get("functions"):
        raise bad_request("the deprecated functions parameter is not supported; use tools", param="functions")
    grammar = _response_format(body)
    toolplan, native = _tools(body, template_messages)
    if toolplan.system is not None:
        if parsed[0].role == "system":
            parsed[0] = ChatMessage("system", parsed[0].content + "\n\n" + toolplan.system)
        else:
            parsed.insert(0, ChatMessage("system", toolplan.system))
        grammar = toolplan.grammar
    stream, include_usage = _stream(body)
    return ParsedGeneration(
        model=model,
        stream=stream,
        include_usage=include_usage,
        request=GenerationRequest(messages=parsed, grammar=grammar, logprobs=_chat_logprobs(body),
                                  tools=native, **_sampling(body)),
        tools=toolplan.system is not None,
    )


def _messages(messages: list[Any]) -> tuple[list[ChatMessage], list[dict[str, Any]]]:
    """The chat as the model reads it: tool calls and tool results in the generic format;
    and as a template that knows tools reads it (OpenAI's messages, arguments as objects)."""
    parsed: list[ChatMessage] = []
    native: list[dict[str, Any]] = []
    calls: dict[str, str | None] = {}  # id -> function name, of calls made earlier in this chat
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request("each message must be an object", param=f"messages.[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"messages.[{i}].role must be one of {', '.join(ROLES)}",
                              param=f"messages.[{i}].role")
        if role == "assistant" and message.get("tool_calls"):
            made = message["tool_calls"]
            if not isinstance(made, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(c.get("function"), dict)
                    for c in made):
                raise bad_request("tool_calls must be an array of {id, type, function: {name, arguments}}",
                                  param=f"messages.[{i}].tool_calls")
            calls.update((c["id"], c["function"].get("name")) for c in made)
            parsed.append(ChatMessage("assistant", tool_calls.render_calls(made)))
            text = message.get("content")
            native.append({"role": "assistant", "content": _content(message, i) if text else None,
                           "tool_calls": [tool_calls.template_call(c) for c in made]})
            continue
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in calls:
                raise bad_request(
                    f"messages.[{i}].tool_call_id {call_id!r} does not answer a tool call of an "
                    "earlier assistant message", param=f"messages.[{i}].tool_call_id")
            parsed.append(ChatMessage("user", tool_calls.render_result(call_id, calls[call_id],
                                                                        _content(message, i))))
            native.append({"role": "tool", "tool_call_id": call_id, "name": calls[call_id],
                           "content": _content(message, i)})
            continue
        parsed.append(ChatMessage(role="system" if role == "developer" else role,
                                  content=_content(message, i)))
        native.append({"role": parsed[-1].role, "content": parsed[-1].content})
    return parsed, native


def _tools(body: dict[str, Any],
           messages: list[dict[str, Any]]) -> tuple[tool_calls.ToolPlan, tool_calls.ToolRequest | None]:
    """The generic format's plan, and the tools for a template that knows them (None: the
    chat has neither tools nor tool messages)."""
    raw = body.get("tools")
    choice = body.get("tool_choice")
    if not raw:
        if choice not in (None, "none", "auto"):
            raise bad_request("tool_choice needs tools", param="tool_choice")
        history = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        native = tool_calls.ToolRequest((), "none", None, False, tuple(messages)) if history else None
        return tool_calls.ToolPlan(None, None), native
    try:
        tools = tool_calls.parse_tools(raw)
    except SchemaError as exc:
        raise bad_request(str(exc), param=exc.param) from None
    named = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        function = choice.get("function")
        named = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(named, str):
            raise bad_request("tool_choice must be none, auto, required or "
                              "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")
        if named not in {t.name for t in tools}:
            raise bad_request(f"tool_choice names {named!r}, which is not in tools", param="tool_choice")
        choice = "function"
    elif choice not in ("none", "auto", "required"):
        raise bad_request("tool_choice must be none, auto, required or a named function", param="tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad_request("parallel_tool_calls must be a boolean", param="parallel_tool_calls")
    try:
        plan = tool_calls.plan(tools, choice, named, parallel)
    except SchemaError as exc:
        raise bad_request(str(exc), param=exc.param) from None
    return plan, tool_calls.ToolRequest(tuple(tools), choice, named, parallel, tuple(messages))


def parse_completion(body: Any) -> ParsedGeneration:
    body = require_object(body)
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise bad_request("prompt must be a string, or one list of token ids", param="prompt")
    elif not isinstance(prompt, str):
        raise bad_request("prompt must be a string, or one list of token ids", param="prompt")
    if body.get("echo") or body.get("suffix") or (body.get("best_of") or 1) != 1:
        raise bad_request("echo, suffix and best_of are not supported", param="echo")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type", "text") == "text"):
        raise bad_request("response_format is a chat completions parameter", param="response_format")
    stream, include_usage = _stream(body)
    sampling = _sampling(body)
    sampling["logprobs"] = _completion_logprobs(body)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        sampling["max_tokens"] = 16  # OpenAI's default for /v1/completions
    return ParsedGeneration(
        model=model,
        stream=stream,
        include_usage=include_usage,
        request=GenerationRequest(prompt=prompt, **sampling),
    )


def parse_embedding(body: Any, max_inputs: int = 2048) -> ParsedEmbedding:
    body = require_object(body)
    model = _model(body)
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts:
        raise bad_request("input must be a string or a non-empty array of strings", param="input")
    if not all(isinstance(t, str) for t in texts):
        raise bad_request("input must be text; token-id arrays are not supported", param="input")
    if any(not t for t in texts):
        raise bad_request("input strings must not be empty", param="input")
    if len(texts) > max_inputs:
        raise bad_request(f"input takes at most {max_inputs} strings", param="input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise bad_request("encoding_format must be 'float' or 'base64'", param="encoding_format")
    return ParsedEmbedding(
        model=model,
        texts=texts,
        encoding_format=encoding,
        dimensions=_optional_int(body, "dimensions", 1),
    )
