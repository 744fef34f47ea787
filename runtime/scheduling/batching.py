"""How many requests a model serves at once: the batching settings and their defaults.

GGUF models run several sequences in one llama.cpp context (continuous batching,
runtime/gguf/gguf_batch.py); each sequence gets a slot with its own share of the KV
cache. ONNX models gather concurrent embedding requests into one run (dynamic
batching, runtime/scheduling/batch_scheduler.py). The operator sets these in the agent's
config ([batching]); "auto" picks from the machine here, so the choice is one
pure function that tests can call.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Slots on a CPU: enough parallel sequences to keep the matrix kernels busy (aggregate
#: decode speed still grows from 4 to 8 sequences on a 2-core machine), few enough that
#: each slot's KV cache stays small.
CPU_SLOTS = 8
GPU_SLOTS = 16
#: Share of the memory available at load time that the slots' KV cache may take on a CPU.
KV_MEMORY_SHARE = 0.25


@dataclass(frozen=True)
class BatchingSettings:
    """The [batching] section as the runtime sees it (0 means "auto")."""

    #: Sequences a GGUF model decodes together; 1 turns continuous batching off (one
    #: request at a time, as before); 0: chosen for the machine (`choose_slots`).
    gguf_slots: int = 0
    #: Context (prompt + answer) per slot, in tokens; 0: the bundle's n_ctx, so a request
    #: may use as much context as without batching.
    gguf_ctx_per_slot: int = 0
    #: Embedding requests an ONNX model runs together at most (1: no dynamic batching).
    onnx_max_batch: int = 16
    #: How long the first request of a batch waits for more, in milliseconds. 0: no
    #: waiting; a batch is whatever queued while the model was busy, so a lone request
    #: is never delayed.
    onnx_max_delay_ms: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.gguf_slots <= 256:
            raise ValueError("gguf_slots must be 0 (auto) to 256")
        if self.gguf_ctx_per_slot != 0 and self.gguf_ctx_per_slot < 16:
            raise ValueError("gguf_ctx_per_slot must be 0 (the bundle's n_ctx) or at least 16")
        if not 1 <= self.onnx_max_batch <= 4096:
            raise ValueError("onnx_max_batch must be 1..4096")
        if not 0 <= self.onnx_max_delay_ms <= 1000:
            raise ValueError("onnx_max_delay_ms must be 0..1000")


def choose_slots(settings: BatchingSettings, gpu: bool) -> int:
    """Sequences one GGUF model decodes together."""
    if settings.gguf_slots:
        return settings.gguf_slots
    return GPU_SLOTS if gpu else CPU_SLOTS


def choose_ctx_per_slot(settings: BatchingSettings, bundle_n_ctx: int) -> int:
    """Context per slot: the operator's figure, else the bundle's whole n_ctx."""
    return settings.gguf_ctx_per_slot or bundle_n_ctx


def fit_slots(slots: int, kv_bytes_per_slot: int, budget_bytes: int) -> int:
    """The most of `slots` whose KV cache fits in `budget_bytes` (at least 1: no batching)."""
    if kv_bytes_per_slot <= 0:
        return slots
    return max(1, min(slots, budget_bytes // kv_bytes_per_slot))
