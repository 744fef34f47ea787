"""How much memory a tensor-model request needs, and how to split it into micro-batches
that fit a model's memory budget.

Why: onnxruntime allocates every intermediate tensor of a run at once, so one
request of 512 texts (or a [64, 512] KServe tensor) took 13 GB on a transformer
whose weights are 23 MB. A request is therefore run as micro-batches of rows,
each sized so that its estimated working set fits the model's budget, and a
request whose single row cannot fit is refused before anything runs.

The estimate per row is ``bytes_per_token * tokens + bytes_per_token_pair *
tokens**2``: the first term covers activations that grow with the row's length,
the second attention scores, which grow with its square. The coefficients are
per bundle (``[onnx]`` in model.toml); the defaults were measured on
all-MiniLM-L6-v2 int8 (6.5 KB and 267 B, peak RSS over 16 rows at 128, 256 and
512 tokens) with a margin. Pure functions: the ONNX backend calls them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from runtime.errors import WorkingSetTooLargeError

MB = 1 << 20


@dataclass(frozen=True)
class WorkingSetModel:
    """Estimated bytes one row of a run needs, from its length in tokens."""

    bytes_per_token: int = 8192
    bytes_per_token_pair: int = 320

    def row_bytes(self, tokens: int, elements: int | None = None) -> int:
        """Bytes for one row of `tokens` free-length positions holding `elements` values
        (default: one per token)."""
        elements = tokens if elements is None else elements
        return self.bytes_per_token * elements + self.bytes_per_token_pair * tokens * tokens


def rows_that_fit(model: WorkingSetModel, budget_bytes: int, tokens: int, elements: int | None = None,
                  what: str = "one input") -> int:
    """How many rows of this size one micro-batch may hold; refuses a row that alone does not fit."""
    row = model.row_bytes(tokens, elements)
    if row > budget_bytes:
        raise WorkingSetTooLargeError(row / MB, budget_bytes / MB, what)
    return max(1, budget_bytes // row)


def length_sorted_batches(lengths: Sequence[int], model: WorkingSetModel, budget_bytes: int) -> list[list[int]]:
    """Indices of rows grouped into micro-batches, longest rows first (so each batch pads
    little), each batch within the budget at its own longest length."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    start = 0
    while start < len(order):
        longest = lengths[order[start]]
        size = rows_that_fit(model, budget_bytes, max(1, longest), what=f"an input of {longest} tokens")
        batches.append(order[start:start + size])
        start += size
    return batches
