"""One loaded version of a model: what it serves through, what it has done, and its smoke test.

`open_version` is the one way a version is opened: the agent's start-up load, an idle
reload, an operator's load and a signed update's stage all go through it, so every
version gets the same scheduler for its backend (continuous batching for a GGUF model,
dynamic batching for an ONNX one) however it arrived. The registry (runtime/registry.py)
decides which version serves a name; this module knows nothing of names or switching.

"Started" is not "healthy": `ServedModel.probe` is one real, tiny inference through the
served model's own work surface (the path requests take), on the input its bundle names
(`[probe]` in model.toml), and it checks the answer is an answer: at least one generated
token, a finite non-zero embedding, finite tensors.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from runtime.backend import (
    Backend,
    Capability,
    ChatMessage,
    EmbeddingResult,
    EmbedRequest,
    GenerationRequest,
    GenerationResult,
    InferRequest,
    JobContext,
    ModelInfo,
    ModelLimits,
    load_backend,
)
from runtime.bundle import ModelBundle
from runtime.devices import MachineSettings
from runtime.errors import ModelLoadError, ProbeFailedError, PromptTooLargeError, RuntimeLayerError
from runtime.scheduling.batch_scheduler import scheduler_for
from runtime.scheduling.latency import REQUEST_DURATION_BUCKETS_S, TIME_PER_OUTPUT_TOKEN_BUCKETS_S, LatencyHistogram
from runtime.scheduling.scheduler import Job, ModelScheduler, SchedulerStats

if TYPE_CHECKING:  # numpy comes with the first model that needs it (its backend, its probe)
    import numpy as np

log = logging.getLogger(__name__)
T = TypeVar("T")


async def open_version(
    bundle: ModelBundle,
    machine: MachineSettings,
    max_pending: int,
    limits: ModelLimits,
    usage: ModelUsage,
) -> ServedModel:
    """Load `bundle`'s backend (off the event loop) and give it the scheduler its backend
    allows. Raises `RuntimeLayerError`; a backend's own bug becomes `ModelLoadError`."""
    try:
        backend = await asyncio.to_thread(load_backend, bundle, machine)
    except RuntimeLayerError:
        raise
    except Exception as exc:  # a backend bug must not take the agent down
        raise ModelLoadError(f"{bundle.name}: {type(exc).__name__}: {exc}") from exc
    scheduler = scheduler_for(bundle.name, backend, machine.batching, max_pending, limits, usage.queue)
    return ServedModel(bundle=bundle, backend=backend, scheduler=scheduler, loaded_at=time.time(), usage=usage)


#: The `operation` of a request's duration: OpenTelemetry's `gen_ai.operation.name` values
#: (chat, text_completion, embeddings), and infer for a KServe v2 tensor inference.
OPERATIONS = ("chat", "text_completion", "embeddings", "infer")


@dataclass
class ModelUsage:
    """What a model name has done since the agent started, across versions.

    Kept by the runtime, where the work happens, so /metrics, telemetry and the
    gRPC side all read the same figures and none of them has to count. Written
    only on the event loop thread.
    """

    prompt_tokens: int = 0
    #: of those, tokens reused from the prefix cache rather than evaluated
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    #: requests by kind: "generate", "embed", "infer"
    requests: dict[str, int] = field(default_factory=dict)
    #: texts embedded (one request may carry many)
    embedded_inputs: int = 0
    #: admitted / rejected / completed / failed / cancelled and busy seconds, shared by every
    #: version's scheduler so they run on across swaps and idle unloads
    queue: SchedulerStats = field(default_factory=SchedulerStats)
    #: from admission to the first generated text, generations only
    time_to_first_token: LatencyHistogram = field(default_factory=LatencyHistogram)
    #: per generation of two tokens or more: (end - first text) / (tokens - 1), OpenTelemetry's
    #: `gen_ai.server.time_per_output_token` (the mean inter-token latency of that request)
    time_per_output_token: LatencyHistogram = field(
        default_factory=lambda: LatencyHistogram(TIME_PER_OUTPUT_TOKEN_BUCKETS_S))
    #: from admission to the end, every admitted request whatever its outcome, by operation
    #: (`OPERATIONS`): OpenTelemetry's `gen_ai.server.request.duration`
    request_duration: dict[str, LatencyHistogram] = field(default_factory=dict)
    #: time.monotonic() of the last admission or completion (idle unload counts from it)
    last_active: float = field(default_factory=time.monotonic)
    idle_unloads: int = 0
    reloads: int = 0

    def count(self, kind: str) -> None:
        self.requests[kind] = self.requests.get(kind, 0) + 1
        self.last_active = time.monotonic()

    def ended(self, operation: str, seconds: float) -> None:
        """An admitted request of `operation` (one of `OPERATIONS`) ended after `seconds`."""
        hist = self.request_duration.get(operation)
        if hist is None:
            hist = self.request_duration[operation] = LatencyHistogram(REQUEST_DURATION_BUCKETS_S)
        hist.observe(seconds)

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())


@dataclass(eq=False)  # a loaded version is itself: compared and hashed by identity
class ServedModel:
    """One loaded version: its bundle, backend and request queue.

    Its `generate`, `embed` and `infer` methods are the runtime's typed work
    surface: every interface (OpenAI HTTP, KServe v2 HTTP and gRPC, health
    probes) calls these, never the backend or the scheduler directly, so the
    runtime can count, batch and probe without knowing who asked.
    """

    bundle: ModelBundle
    backend: Backend
    scheduler: ModelScheduler
    loaded_at: float
    usage: ModelUsage = field(default_factory=ModelUsage)

    def generate(self, request: GenerationRequest) -> Job[GenerationResult]:
        """Admit a generation; its text arrives through `Job.stream()` (raises 429-style
        `OverloadedError` at once when the queue is full). Cancel the job when the caller
        leaves."""
        self._check_prompt_size(request)
        backend = self.backend
        job = self.scheduler.submit(lambda ctx: backend.generate(request, ctx), request)
        usage = self.usage
        usage.count("generate")

        def counted(future: asyncio.Future[GenerationResult]) -> None:
            usage.last_active = ended = time.monotonic()
            usage.ended("chat" if request.messages is not None else "text_completion", ended - job.enqueued_at)
            if job.first_emit_at is not None:
                usage.time_to_first_token.observe(job.first_emit_at - job.enqueued_at)
            # A cancelled generation still returns what it produced; count that too.
            if not future.cancelled() and future.exception() is None:
                result = future.result()
                usage.prompt_tokens += result.prompt_tokens
                usage.cached_prompt_tokens += result.cached_tokens
                usage.generated_tokens += result.completion_tokens
                if job.first_emit_at is not None and result.completion_tokens > 1:
                    usage.time_per_output_token.observe(
                        (ended - job.first_emit_at) / (result.completion_tokens - 1))

        job.future.add_done_callback(counted)
        return job

    def _check_prompt_size(self, request: GenerationRequest) -> None:
        """Refuse what can be refused by counting, before the model tokenizes anything."""
        limits = self.scheduler.limits
        if request.messages is not None:
            if len(request.messages) > limits.max_messages:
                raise PromptTooLargeError(
                    f"this chat has {len(request.messages)} messages; the limit is {limits.max_messages}",
                    param="messages",
                )
            chars = sum(len(m.content) for m in request.messages)
        else:
            chars = len(request.prompt) if isinstance(request.prompt, str) else 0
        if chars > limits.max_prompt_chars:
            raise PromptTooLargeError(
                f"this prompt has {chars} characters; the limit is {limits.max_prompt_chars}",
                param="messages" if request.messages is not None else "prompt",
            )

    async def embed(self, texts: list[str], normalize: bool | None = None) -> EmbeddingResult:
        """Embed `texts` (one vector each); if the caller is cancelled the work stops."""
        backend = self.backend
        result = await self._run("embed", lambda ctx: backend.embed(texts, normalize, ctx),
                                 EmbedRequest(texts, normalize), operation="embeddings")
        self.usage.embedded_inputs += len(texts)
        self.usage.prompt_tokens += result.prompt_tokens
        return result

    async def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the model on named tensors; `outputs` picks which to return (None: all)."""
        backend = self.backend
        return await self._run("infer", lambda ctx: backend.infer(inputs, outputs, ctx),
                               InferRequest(inputs, tuple(outputs) if outputs else None), operation="infer")

    async def _run(self, kind: str, work: Callable[[JobContext], T], request: object = None,
                   operation: str = "infer") -> T:
        """Admit `work` (serving the typed `request`, which a batching scheduler may run with
        others), count it as a `kind` request once admitted (its duration under `operation`),
        wait for it; a caller that is cancelled stops the work."""
        job = self.scheduler.submit(work, request)
        self.usage.count(kind)
        try:
            return await job.result()
        finally:
            job.cancel()
            self.usage.last_active = ended = time.monotonic()
            self.usage.ended(operation, ended - job.enqueued_at)

    async def probe(self) -> str:
        """Run the model's smoke test; returns a one-line summary or raises ProbeFailedError."""
        return await _probe(self)

    async def close(self, drain_timeout_s: float) -> None:
        """Finish what was admitted (up to `drain_timeout_s`), then free the backend's memory.
        Every version that was opened is closed this way, serving or not, so no native model
        outlives the event loop (a llama.cpp context freed at interpreter exit can crash)."""
        await self.scheduler.close(drain_timeout_s)
        await asyncio.to_thread(self.backend.close)
        log.info("model %s version %s unloaded", self.name, self.version)

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def info(self) -> ModelInfo:
        return self.backend.info


async def _probe(served: ServedModel) -> str:
    import numpy as np

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
    import numpy as np

    dims = tuple(d if d > 0 else 1 for d in shape)
    if dtype == "object":
        return np.full(dims, text, dtype=object)
    return np.zeros(dims, dtype=dtype)
