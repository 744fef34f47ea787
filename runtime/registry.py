"""The model registry: which models are loaded, in what state, and the atomic switch.

A name maps to at most one *serving* version. Loading a name that already
serves builds the new version beside the old one, and only when the new one
has loaded does the name point at it: one dict assignment on the event loop,
so every request sees either the old or the new model, never neither. The old
version then drains what it had admitted and is unloaded. This is the hot swap
that signed updates build on; `load` at start-up is the same call.

Signed updates take the switch apart into steps, so a version is proven before
it serves and the old one stays ready until the new one is confirmed:
`stage` loads a version beside the serving one (it takes no requests),
`probe` runs the model's smoke test on it (a real inference), `commit` makes
it serve and keeps the previous version loaded ("warm"), `confirm` retires the
warm one, `rollback` switches back to it at once, `discard` drops a staged
version that never served. Each step is a `RegistryEvent` to whoever
subscribed (sync/ publishes them; an audit log can record them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, TypeVar

from .backend import (
    Backend,
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
from .batch_scheduler import scheduler_for
from .bundle import ModelBundle
from .devices import MachineSettings
from .errors import (
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    PromptTooLargeError,
    RuntimeLayerError,
)
from .latency import LatencyHistogram
from .scheduler import Job, ModelScheduler, SchedulerStats

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)
T = TypeVar("T")


class ModelState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"
    #: unloaded after its keep-alive to save memory and energy; the next request reloads it
    UNLOADED = "unloaded"


class RegistryEventKind(StrEnum):
    STAGED = "staged"
    ACTIVE = "active"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"


@dataclass(frozen=True)
class RegistryEvent:
    """A version of a model changed role: loaded beside (staged), serving (active), refused
    (failed) or replaced by the one before it (rolled back)."""

    kind: RegistryEventKind
    name: str
    version: str
    previous: str | None = None
    reason: str | None = None
    at: float = field(default_factory=time.time)


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
    #: time.monotonic() of the last admission or completion (idle unload counts from it)
    last_active: float = field(default_factory=time.monotonic)
    idle_unloads: int = 0
    reloads: int = 0

    def count(self, kind: str) -> None:
        self.requests[kind] = self.requests.get(kind, 0) + 1
        self.last_active = time.monotonic()

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())


@dataclass
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
            usage.last_active = time.monotonic()
            if job.first_emit_at is not None:
                usage.time_to_first_token.observe(job.first_emit_at - job.enqueued_at)
            # A cancelled generation still returns what it produced; count that too.
            if not future.cancelled() and future.exception() is None:
                result = future.result()
                usage.prompt_tokens += result.prompt_tokens
                usage.cached_prompt_tokens += result.cached_tokens
                usage.generated_tokens += result.completion_tokens

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
                                 EmbedRequest(texts, normalize))
        self.usage.embedded_inputs += len(texts)
        self.usage.prompt_tokens += result.prompt_tokens
        return result

    async def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the model on named tensors; `outputs` picks which to return (None: all)."""
        backend = self.backend
        return await self._run("infer", lambda ctx: backend.infer(inputs, outputs, ctx),
                               InferRequest(inputs, tuple(outputs) if outputs else None))

    async def _run(self, kind: str, work: Callable[[JobContext], T], request: object = None) -> T:
        """Admit `work` (serving the typed `request`, which a batching scheduler may run with
        others), count it as a `kind` request once admitted, wait for it; a caller that is
        cancelled stops the work."""
        job = self.scheduler.submit(work, request)
        self.usage.count(kind)
        try:
            return await job.result()
        finally:
            job.cancel()
            self.usage.last_active = time.monotonic()

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def info(self) -> ModelInfo:
        return self.backend.info


@dataclass(frozen=True)
class ModelStatus:
    """What the registry knows of a name, for listings and readiness."""

    name: str
    state: ModelState
    version: str | None
    path: str | None
    error: str | None = None
    loaded_at: float | None = None
    info: ModelInfo | None = None


class ModelRegistry:
    """Loads, serves, swaps and unloads models by name."""

    def __init__(
        self,
        machine: MachineSettings,
        max_pending: int = 16,
        drain_timeout_s: float = 30.0,
        limits_for: Callable[[str], ModelLimits] | None = None,
    ) -> None:
        self._machine = machine
        self._limits_for = limits_for or (lambda name: ModelLimits())
        self._max_pending = max_pending
        self._drain_timeout_s = drain_timeout_s
        self._serving: dict[str, ServedModel] = {}
        self._status: dict[str, ModelStatus] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._usage: dict[str, ModelUsage] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        #: the version that served before an unconfirmed commit, still loaded for rollback
        self._warm: dict[str, ServedModel] = {}
        self._subscribers: list[Callable[[RegistryEvent], None]] = []
        self._watchers: list[Callable[[str], None]] = []
        #: name -> seconds idle before an unload (absent or 0: stays loaded)
        self.keep_alive_s: dict[str, float] = {}
        self._idle: dict[str, ModelBundle] = {}
        self._reloading: dict[str, asyncio.Task[ServedModel]] = {}

    def watch(self, callback: Callable[[str], None]) -> None:
        """Call `callback(name)` on the loop whenever a name's status changes (load, swap,
        unload, failure), so the MQTT state message and listings can follow without polling."""
        self._watchers.append(callback)

    def _changed(self, name: str) -> None:
        for callback in self._watchers:
            try:
                callback(name)
            except Exception:  # a watcher's bug must not break a load or swap
                log.exception("registry watcher failed")

    def set_limits(self, max_pending: int, drain_timeout_s: float) -> None:
        """Change admission, drain and per-request limits live (config reload): serving models
        (their next request) and later loads. Per-request limits come from `limits_for`."""
        self._max_pending = max_pending
        self._drain_timeout_s = drain_timeout_s
        for served in self._serving.values():
            served.scheduler.max_pending = max_pending
            served.scheduler.limits = self._limits_for(served.name)

    def get(self, name: str) -> ServedModel:
        """The version serving `name` now; raises if unknown or not ready."""
        served = self._serving.get(name)
        if served is not None:
            return served
        status = self._status.get(name)
        if status is None:
            raise ModelNotFoundError(name)
        raise ModelNotReadyError(name, status.state.value)

    async def acquire(self, name: str) -> ServedModel:
        """The version serving `name`, reloading it first when it was unloaded for being idle
        (the request waits for the load instead of failing); otherwise as `get`."""
        served = self._serving.get(name)
        if served is not None:
            return served
        if name not in self._idle and name not in self._reloading:
            return self.get(name)
        task = self._reloading.get(name)
        if task is None:
            task = self._reloading[name] = asyncio.create_task(self._reload(name), name=f"reload:{name}")
            task.add_done_callback(lambda _: self._reloading.pop(name, None))
        return await asyncio.shield(task)

    async def _reload(self, name: str) -> ServedModel:
        bundle = self._idle[name]
        log.info("model %s: reloading for a request after an idle unload", name)
        served = await self.load(bundle)
        served.usage.reloads += 1
        return served

    async def unload_idle(self, now: float | None = None) -> list[str]:
        """Unload every model idle (nothing admitted) longer than its keep-alive; it stays
        listed as ``unloaded`` and reloads on its next request. Returns the names unloaded."""
        now = time.monotonic() if now is None else now
        done = []
        for name, served in list(self._serving.items()):
            keep = self.keep_alive_s.get(name, 0.0)
            if keep <= 0 or served.scheduler.depth or now - served.usage.last_active < keep:
                continue
            async with self._locks.setdefault(name, asyncio.Lock()):
                if self._serving.get(name) is not served or served.scheduler.depth:
                    continue
                del self._serving[name]
                self._idle[name] = served.bundle  # from now on a request waits for a reload, never fails
                self._set_status(served.bundle, ModelState.UNLOADING)
                await self._shutdown(served)
                served.usage.idle_unloads += 1
                self._set_status(served.bundle, ModelState.UNLOADED, served=served)  # listings keep its card
                log.info("model %s: unloaded after %.0fs idle (keep-alive %.0fs)", name,
                         now - served.usage.last_active, keep)
                done.append(name)
        return done

    def busy_seconds(self) -> dict[str, float]:
        """Per name: seconds spent running requests, including the one running now."""
        busy = {name: usage.queue.busy_seconds for name, usage in self._usage.items()}
        for served in self._serving.values():
            busy[served.name] = busy.get(served.name, 0.0) + served.scheduler.running_for_s()
        return busy

    def serving(self) -> list[ServedModel]:
        return list(self._serving.values())

    def usage(self) -> dict[str, ModelUsage]:
        """Per-name usage since start, kept across version swaps and unloads."""
        return dict(self._usage)

    def statuses(self) -> list[ModelStatus]:
        return [self._status[name] for name in sorted(self._status)]

    def all_ready(self) -> bool:
        """Every known model answers requests (an idle-unloaded one does: it reloads)."""
        return all(s.state in (ModelState.READY, ModelState.UNLOADED) for s in self._status.values())

    async def load(self, bundle: ModelBundle) -> ServedModel:
        """Load `bundle`; if its name already serves, switch to it once it is ready."""
        async with self._locks.setdefault(bundle.name, asyncio.Lock()):
            previous = self._serving.get(bundle.name)
            if previous is None:
                self._set_status(bundle, ModelState.LOADING)
            started = time.monotonic()
            try:
                backend = await asyncio.to_thread(load_backend, bundle, self._machine)
            except RuntimeLayerError as exc:
                self._load_failed(bundle, previous, str(exc))
                raise
            except Exception as exc:  # a backend bug must not take the agent down
                self._load_failed(bundle, previous, f"{type(exc).__name__}: {exc}")
                raise ModelLoadError(f"{bundle.name}: {exc}") from exc
            usage = self._usage.setdefault(bundle.name, ModelUsage())
            served = ServedModel(
                bundle=bundle,
                backend=backend,
                scheduler=scheduler_for(bundle.name, backend, self._machine.batching, self._max_pending,
                                        self._limits_for(bundle.name), usage.queue),
                loaded_at=time.time(),
                usage=usage,
            )
            usage.last_active = time.monotonic()  # a fresh load gets a whole keep-alive
            self._idle.pop(bundle.name, None)
            self._serving[bundle.name] = served  # the atomic switch
            self._set_status(bundle, ModelState.READY, served=served)
            log.info(
                "model %s version %s ready in %.2fs%s",
                bundle.name,
                bundle.version,
                time.monotonic() - started,
                f" (replacing version {previous.version})" if previous else "",
            )
            if previous is not None:
                self._retire(previous)
            self._retire_warm(bundle.name)
            self._emit(RegistryEvent(RegistryEventKind.ACTIVE, bundle.name, bundle.version,
                                     previous.version if previous else None))
            return served

    # ---- signed updates: stage, probe, commit, confirm or roll back -------------------

    def subscribe(self, callback: Callable[[RegistryEvent], None]) -> Callable[[], None]:
        """Call `callback` (on the event loop) for every registry event; returns an unsubscribe."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    def _emit(self, event: RegistryEvent) -> None:
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:  # a subscriber's bug must not change what serves
                log.exception("registry event subscriber failed on %s", event)

    async def stage(self, bundle: ModelBundle) -> ServedModel:
        """Load `bundle` beside whatever serves its name; it takes no requests until `commit`."""
        async with self._locks.setdefault(bundle.name, asyncio.Lock()):
            started = time.monotonic()
            try:
                backend = await asyncio.to_thread(load_backend, bundle, self._machine)
            except Exception as exc:
                reason = str(exc) if isinstance(exc, RuntimeLayerError) else f"{type(exc).__name__}: {exc}"
                self._emit(RegistryEvent(RegistryEventKind.FAILED, bundle.name, bundle.version, reason=reason))
                if isinstance(exc, RuntimeLayerError):
                    raise
                raise ModelLoadError(f"{bundle.name}: {exc}") from exc
            usage = self._usage.setdefault(bundle.name, ModelUsage())
            staged = ServedModel(
                bundle=bundle,
                backend=backend,
                scheduler=ModelScheduler(bundle.name, self._max_pending, limits=self._limits_for(bundle.name),
                                         stats=usage.queue),
                loaded_at=time.time(),
                usage=usage,
            )
            log.info("model %s version %s staged in %.2fs", bundle.name, bundle.version, time.monotonic() - started)
            serving = self._serving.get(bundle.name)
            self._emit(RegistryEvent(RegistryEventKind.STAGED, bundle.name, bundle.version,
                                     serving.version if serving else None))
            return staged

    async def probe(self, served: ServedModel) -> str:
        """The model's smoke test (runtime/probe.py) on a staged or serving version."""
        from .probe import probe  # probe needs ServedModel from this module

        return await probe(served)

    async def commit(self, staged: ServedModel) -> ServedModel | None:
        """Make a staged version serve (one dict assignment: in-flight requests finish on the
        old one, new ones go to the new). The old one stays loaded until `confirm`."""
        async with self._locks.setdefault(staged.name, asyncio.Lock()):
            previous = self._serving.get(staged.name)
            staged.usage.last_active = time.monotonic()  # a fresh version gets a whole keep-alive
            self._idle.pop(staged.name, None)
            self._serving[staged.name] = staged  # the atomic switch
            self._set_status(staged.bundle, ModelState.READY, served=staged)
            self._retire_warm(staged.name)
            if previous is not None:
                self._warm[staged.name] = previous
            log.info("model %s version %s serving%s", staged.name, staged.version,
                     f" ({previous.version} kept warm)" if previous else "")
            self._emit(RegistryEvent(RegistryEventKind.ACTIVE, staged.name, staged.version,
                                     previous.version if previous else None))
            return previous

    async def confirm(self, name: str) -> None:
        """The serving version passed its health check: unload the warm previous one."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            self._retire_warm(name)

    def warm_version(self, name: str) -> str | None:
        warm = self._warm.get(name)
        return warm.version if warm else None

    async def rollback(self, name: str, reason: str, bundle: ModelBundle | None = None) -> ServedModel:
        """Serve the version before the current one again: the warm one at once, else `bundle`
        (loaded first, the current one serving meanwhile). The version rolled back from drains
        and unloads."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            current = self._serving.get(name)
            target = self._warm.pop(name, None)
        if target is None:
            if bundle is None:
                raise ModelNotFoundError(name) if current is None else ModelLoadError(
                    f"{name}: no earlier version is loaded or given to roll back to")
            target = await self.stage(bundle)
        async with self._locks.setdefault(name, asyncio.Lock()):
            current = self._serving.get(name)
            target.usage.last_active = time.monotonic()
            self._idle.pop(name, None)
            self._serving[name] = target
            self._set_status(target.bundle, ModelState.READY, served=target)
            if current is not None and current is not target:
                self._retire(current)
            log.warning("model %s rolled back to version %s: %s", name, target.version, reason)
            self._emit(RegistryEvent(RegistryEventKind.ROLLED_BACK, name, target.version,
                                     current.version if current else None, reason))
            return target

    async def discard(self, staged: ServedModel, reason: str) -> None:
        """Unload a staged version that will not serve (its probe failed)."""
        if self._serving.get(staged.name) is staged:
            raise ModelLoadError(f"{staged.name} {staged.version} serves; roll back instead of discarding")
        self._emit(RegistryEvent(RegistryEventKind.FAILED, staged.name, staged.version, reason=reason))
        await self._shutdown(staged)

    def _retire_warm(self, name: str) -> None:
        warm = self._warm.pop(name, None)
        if warm is not None:
            self._retire(warm)

    async def unload(self, name: str) -> None:
        """Stop serving `name`: refuse new requests, finish admitted ones, free memory."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            served = self._serving.pop(name, None)
            if served is None:
                self._idle.pop(name, None)
                if self._status.pop(name, None) is None:
                    raise ModelNotFoundError(name)
                self._changed(name)
                return
            self._set_status(served.bundle, ModelState.UNLOADING)
            self._retire_warm(name)
            await self._shutdown(served)
            self._status.pop(name, None)
            self._changed(name)

    async def begin_shutdown(self, deadline: float, grace_s: float = 2.0) -> None:
        """Agent shutdown: every model refuses new and queued work now and stops what still
        runs at `deadline` (time.monotonic()); returns when nothing runs. `close` then unloads."""
        await asyncio.gather(*(s.scheduler.shutdown(deadline, grace_s) for s in self._serving.values()))

    async def close(self) -> None:
        """Unload everything (agent shutdown)."""
        for name in list(self._serving):
            await self.unload(name)
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    def record_failure(self, name: str, path: str, error: str) -> None:
        """Note a model that could not even be read, so listings and /readyz show it."""
        if name not in self._serving:
            self._status[name] = ModelStatus(
                name=name, state=ModelState.FAILED, version=None, path=path, error=error
            )
            self._changed(name)

    def _retire(self, served: ServedModel) -> None:
        task = asyncio.create_task(self._shutdown(served), name=f"retire:{served.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _shutdown(self, served: ServedModel) -> None:
        await served.scheduler.close(self._drain_timeout_s)
        await asyncio.to_thread(served.backend.close)
        log.info("model %s version %s unloaded", served.name, served.version)

    def _load_failed(self, bundle: ModelBundle, previous: ServedModel | None, error: str) -> None:
        log.error("model %s version %s failed to load: %s", bundle.name, bundle.version, error)
        if previous is None:
            self._idle.pop(bundle.name, None)
            self._set_status(bundle, ModelState.FAILED, error=error)

    def _set_status(
        self,
        bundle: ModelBundle,
        state: ModelState,
        served: ServedModel | None = None,
        error: str | None = None,
    ) -> None:
        before = self._status.get(bundle.name)
        keep = served is None and before is not None and state in (ModelState.LOADING, ModelState.UNLOADING)
        self._status[bundle.name] = ModelStatus(
            name=bundle.name,
            state=state,
            version=bundle.version,
            path=str(bundle.path),
            error=error,
            # an idle unload and its reload keep what listings show of the model
            loaded_at=served.loaded_at if served else before.loaded_at if keep and before else None,
            info=served.info if served else before.info if keep and before else None,
        )
        self._changed(bundle.name)
