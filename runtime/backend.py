"""The backend protocol: what GGUF, ONNX and any future format implement.

A backend owns one loaded model. Its methods are blocking and are only ever
called from that model's scheduler thread, one request at a time, so backends
need no locking. They report progress through a `JobContext`: `emit` streams
partial results to the waiting coroutine and `cancelled` says the client left.
The registry knows this protocol and `load_backend`, never a backend's insides.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from runtime.errors import BundleError, UnsupportedOperationError

if TYPE_CHECKING:
    import numpy as np

    from runtime.bundle import ModelBundle
    from runtime.devices import MachineSettings
    from runtime.gguf.tool_calls import ToolRequest


class Capability(StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    TENSOR = "tensor"


@dataclass(frozen=True)
class ModelLimits:
    """What one request may use of a model: set per model by the agent's config."""

    #: Working memory for one request (activations, outputs), in bytes.
    memory_budget_bytes: int = 1 << 30
    #: Seconds of model time for one request; past it the job's cancel flag is raised.
    max_model_time_s: float = 120.0
    #: Messages in one chat, and characters in one prompt: checked before it is queued.
    max_messages: int = 2048
    max_prompt_chars: int = 262_144


class JobContext(Protocol):
    """What a running request may do besides returning its result.

    `cancelled` turns true when the client left, the model-time limit passed or the
    agent is shutting down; work that cannot return a partial result then raises
    `WorkStopped` and the scheduler reports why."""

    limits: ModelLimits

    def cancelled(self) -> bool: ...

    def emit(self, item: Any) -> None: ...


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """A chat or text completion, already validated by the caller."""

    messages: list[ChatMessage] | None = None
    prompt: str | list[int] | None = None
    #: None: until the context is full.
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    #: GBNF (root rule `root`) that every generated token must keep the text within
    #: (structured output, tool calls; runtime/gguf/grammar.py); None: free text.
    grammar: str | None = None
    #: How many most likely alternatives to report with each token's log probability
    #: (0..20); None: no log probabilities.
    logprobs: int | None = None
    #: A chat with tools or tool messages, for a model whose template knows tools: it renders
    #: this instead of `messages` and uses its own call grammar (runtime/gguf/chat_formats.py).
    tools: ToolRequest | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log probability (log-softmax of its logits row, before any
    sampling setting) and the `top` most likely tokens of that row, emitted before its text."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """A piece of generated text, emitted as soon as it is known to be final."""

    text: str


@dataclass(frozen=True)
class GenerationResult:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    #: prompt tokens whose KV came from the prefix cache (not re-evaluated)
    cached_tokens: int = 0


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: np.ndarray
    prompt_tokens: int
    #: tokens of each input (when the backend counts them), so a batch run for several
    #: requests can give each its own exact count
    input_tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class EmbedRequest:
    """Texts to embed: what the ONNX dynamic batcher gathers from several clients."""

    texts: list[str]
    normalize: bool | None = None


@dataclass(frozen=True)
class InferRequest:
    """Named tensors to run (and which outputs to return; None: all): the ONNX dynamic
    batcher stacks requests of the same signature along their first dimension."""

    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...] | None = None

    def rows(self) -> int | None:
        """Rows along the first dimension, when every input has that many (else None)."""
        counts = {array.shape[0] if array.ndim else None for array in self.inputs.values()}
        return counts.pop() if len(counts) == 1 else None

    def signature(self) -> tuple[object, ...]:
        """What two requests must share to run as one: names, dtypes, shapes past the first
        dimension, and the outputs asked for."""
        return (self.outputs, tuple(sorted((name, array.dtype.str, array.shape[1:])
                                           for name, array in self.inputs.items())))


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, numpy dtype name, shape (-1 for a free dimension)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model can do and how it was placed on the machine."""

    capabilities: frozenset[Capability]
    platform: str
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    context_length: int | None = None
    embedding_dim: int | None = None
    placement: tuple[str, ...] = ()
    #: How the model writes tool calls (runtime/gguf/chat_formats.py): generic, hermes or llama3.
    tool_format: str = "generic"


class Backend(Protocol):
    """One loaded model. Blocking; called from one thread at a time."""

    info: ModelInfo

    def generate(self, request: GenerationRequest, ctx: JobContext) -> GenerationResult: ...

    def embed(self, texts: list[str], normalize: bool | None, ctx: JobContext) -> EmbeddingResult: ...

    def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None, ctx: JobContext
    ) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class BackendBase:
    """Refuses every operation; backends override what they support."""

    info: ModelInfo

    def generate(self, request: GenerationRequest, ctx: JobContext) -> GenerationResult:
        raise UnsupportedOperationError("this model does not generate text")

    def embed(self, texts: list[str], normalize: bool | None, ctx: JobContext) -> EmbeddingResult:
        raise UnsupportedOperationError("this model does not produce embeddings")

    def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None, ctx: JobContext
    ) -> dict[str, np.ndarray]:
        raise UnsupportedOperationError("this model does not take raw tensors")

    def close(self) -> None:
        pass


#: format -> "module:Class". Imported lazily so an agent serving only ONNX never
#: loads llama.cpp (and an idle agent loads neither).
#: "format:task" picks a backend for one task of a format (GGUF embeddings: embedding mode).
BACKENDS: dict[str, str] = {
    "gguf": "runtime.gguf.gguf_backend:GgufBackend",
    "gguf:embedding": "runtime.gguf.gguf_embedding:GgufEmbeddingBackend",
    "onnx": "runtime.onnx_backend:OnnxBackend",
}


def load_backend(bundle: ModelBundle, machine: MachineSettings) -> Backend:
    """Load `bundle` with the backend registered for its format (blocking)."""
    manifest = bundle.manifest
    target = BACKENDS.get(f"{manifest.format}:{manifest.task}") or BACKENDS.get(manifest.format)
    if target is None:
        raise BundleError(f"no backend for format {bundle.manifest.format!r}")
    module_name, _, class_name = target.partition(":")
    backend_cls = getattr(importlib.import_module(module_name), class_name)
    return backend_cls(bundle, machine)
