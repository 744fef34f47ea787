"""Validate OpenAI request bodies into runtime requests.

Each check names the offending field in `param`, as OpenAI does, so a client
sees ``{"param": "temperature", "message": "temperature must be between 0 and
2"}`` rather than a failure deep in llama.cpp. Unknown fields are ignored, as
OpenAI-compatible servers do; fields we cannot honour (tools, n > 1, images,
logprobs, JSON response formats) are refused rather than silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.http.errors import bad_request
from runtime.backend import ChatMessage, GenerationRequest

MAX_STOP_SEQUENCES = 4
ROLES = ("system", "user", "assistant", "developer", "tool")


@dataclass(frozen=True)
class ParsedGeneration:
    model: str
    stream: bool
    include_usage: bool
    request: GenerationRequest


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
    if body.get("logprobs"):
        raise bad_request("logprobs are not supported by this server", param="logprobs")
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type", "text") != "text"
    ):
        raise bad_request("only response_format {\"type\": \"text\"} is supported", param="response_format")


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
    parsed: list[ChatMessage] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request("each message must be an object", param=f"messages.[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"messages.[{i}].role must be one of {', '.join(ROLES)}",
                              param=f"messages.[{i}].role")
        parsed.append(ChatMessage(role="system" if role == "developer" else role,
                                  content=_content(message, i)))
    if body.get("tools") or body.get("functions"):
        raise bad_request("tool calling is not supported by this server", param="tools")
    stream, include_usage = _stream(body)
    return ParsedGeneration(
        model=model,
        stream=stream,
        include_usage=include_usage,
        request=GenerationRequest(messages=parsed, **_sampling(body)),
    )


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
    stream, include_usage = _stream(body)
    sampling = _sampling(body)
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
