"""The smoke test a model version must pass before it serves, and after.

"Started" is not "healthy": a probe is one real, tiny inference through the
served model's own work surface (the same path requests take), on the input its
bundle names (`[probe]` in model.toml), and it checks the answer is an answer:
at least one generated token, a finite non-zero embedding, finite tensors.
"""

from __future__ import annotations

import math

import numpy as np

from .backend import Capability, ChatMessage, GenerationRequest
from .errors import ProbeFailedError, RuntimeLayerError
from .registry import ServedModel


async def probe(served: ServedModel) -> str:
    """Run the model's smoke test; returns a one-line summary or raises ProbeFailedError."""
    options = served.bundle.manifest.probe
    caps = served.info.capabilities
    try:
        if Capability.CHAT in caps or Capability.COMPLETION in caps:
            request = (
                GenerationRequest(
                    messages=[ChatMessage("user", options.text)], max_tokens=options.max_tokens, temperature=0.0
                )
                if Capability.CHAT in caps
                else GenerationRequest(prompt=options.text, max_tokens=options.max_tokens, temperature=0.0)
            )
            job = served.generate(request)
            try:
                async for _ in job.stream():
                    pass
                result = await job.result()
            finally:
                job.cancel()
            if result.completion_tokens < 1:
                raise ProbeFailedError(f"{served.name} {served.version}: generated no token for the probe")
            return f"generated {result.completion_tokens} token(s)"
        if Capability.EMBEDDING in caps:
            vectors = (await served.embed([options.text])).vectors
            norm = float(np.linalg.norm(vectors))
            if not math.isfinite(norm) or norm == 0.0:
                raise ProbeFailedError(f"{served.name} {served.version}: the probe's embedding is {norm}")
            return f"embedding of dimension {vectors.shape[-1]}"
        if Capability.TENSOR in caps:
            inputs = {spec.name: _zeros(spec.dtype, spec.shape, options.text) for spec in served.info.inputs}
            outputs = await served.infer(inputs)
            for name, array in outputs.items():
                if array.dtype.kind == "f" and not np.isfinite(array).all():
                    raise ProbeFailedError(f"{served.name} {served.version}: output {name} is not finite")
            return f"{len(outputs)} output tensor(s)"
    except ProbeFailedError:
        raise
    except RuntimeLayerError as exc:
        raise ProbeFailedError(f"{served.name} {served.version}: the probe failed: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a backend bug is a failed probe, not an agent crash
        raise ProbeFailedError(
            f"{served.name} {served.version}: the probe failed: {type(exc).__name__}: {exc}"
        ) from None
    raise ProbeFailedError(f"{served.name} {served.version}: no capability to probe")


def _zeros(dtype: str, shape: tuple[int, ...], text: str) -> np.ndarray:
    dims = tuple(d if d > 0 else 1 for d in shape)
    if dtype == "object":
        return np.full(dims, text, dtype=object)
    return np.zeros(dims, dtype=dtype)
