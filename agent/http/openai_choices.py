"""OpenAI's shapes for what a generation carries besides text: log probabilities (chat's
`logprobs.content[]` and the legacy completions form) and tool calls (whole, or as the
`delta.tool_calls` pieces of a stream).

Kept apart from openai_api.py, which moves text; this module only shapes JSON.
"""

from __future__ import annotations

from typing import Any

from runtime.backend import TokenLogprob

#: Characters of a call's arguments per streamed delta (OpenAI streams them in pieces).
ARGUMENT_PIECE = 16


def _text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


def chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    """`choices[].logprobs` of a chat completion (or one chunk of its stream)."""
    return {
        "content": [
            {
                "token": _text(item.token),
                "logprob": item.logprob,
                "bytes": list(item.token),
                "top_logprobs": [{"token": _text(t), "logprob": lp, "bytes": list(t)} for t, lp in item.top],
            }
            for item in items
        ],
        "refusal": None,
    }


def completion_logprobs(items: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The legacy `choices[].logprobs` of /v1/completions; `offset`: characters of text
    before the first token (for text_offset)."""
    tokens, offsets = [], []
    for item in items:
        text = _text(item.token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [item.logprob for item in items],
        "top_logprobs": [{_text(t): lp for t, lp in item.top} for item in items],
        "text_offset": offsets,
    }


def tool_call_deltas(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `delta` objects that stream `calls` as OpenAI does: per call, one with its index,
    id, type and name (arguments empty), then its arguments in pieces."""
    deltas: list[dict[str, Any]] = []
    for index, call in enumerate(calls):
        function = call["function"]
        deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                       "function": {"name": function["name"], "arguments": ""}}]})
        arguments = function["arguments"]
        for start in range(0, len(arguments), ARGUMENT_PIECE):
            deltas.append({"tool_calls": [{"index": index, "function": {
                "arguments": arguments[start:start + ARGUMENT_PIECE]}}]})
    return deltas
