"""llama.cpp settings and types that the one-at-a-time path and the batching engine share.

Kept apart from both so that neither imports the other for a constant, and so that
benchmarks and tests open their in-process baseline with the very settings the agent uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Sampling defaults of llama-cpp-python's create_chat_completion, kept so that
#: a request through the agent samples exactly as an in-process call would.
LLAMA_SAMPLING_DEFAULTS: dict[str, Any] = {
    "top_k": 40, "min_p": 0.05, "typical_p": 1.0, "repeat_penalty": 1.0,
}

#: KV cache types: llama.cpp's ggml type id and bytes per element (q8_0: 34-byte blocks of 32).
KV_TYPES: dict[str, tuple[int, float]] = {"f16": (1, 2.0), "q8_0": (8, 34 / 32)}


def kv_cache_args(kv_type: str) -> dict[str, Any]:
    """llama_cpp.Llama's arguments for a KV cache of `kv_type` (keys and values alike)."""
    return {"type_k": KV_TYPES[kv_type][0], "type_v": KV_TYPES[kv_type][0]}


def kv_bytes_per_token(llm: Any, kv_type: str = "f16") -> int:
    """Bytes of KV cache one token takes (keys and values of `kv_type`, every layer)."""
    import llama_cpp

    model = llm._model.model
    n_head = max(1, llama_cpp.llama_model_n_head(model))
    head_dim = llama_cpp.llama_model_n_embd(model) // n_head
    elements = 2 * llama_cpp.llama_model_n_layer(model) * llama_cpp.llama_model_n_head_kv(model) * head_dim
    return int(elements * KV_TYPES[kv_type][1])


@dataclass(frozen=True)
class PreparedPrompt:
    """A checked request's prompt tokens, stop strings (the request's and the template's) and
    how many tokens it may generate."""

    tokens: list[int]
    stops: list[str]
    max_tokens: int
    #: GBNF the output must keep to (the request's, or the model's own tool-call grammar)
    grammar: str | None = None
