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
version that never served. Each step, and every change of a name's status, is a
`RegistryEvent` to whoever subscribed (sync/ reports update steps, the MQTT state
message follows status changes).

Every version, however it arrives (start-up, idle reload, operator load, signed
update), is opened by `runtime.served_model.open_version`, so it gets the same
scheduler; what a version is and does lives there, which version serves lives here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from runtime.backend import ModelInfo, ModelLimits
from runtime.bundle import ModelBundle
from runtime.devices import MachineSettings
from runtime.errors import ModelLoadError, ModelNotFoundError, ModelNotReadyError, RuntimeLayerError
from runtime.served_model import ModelUsage, ServedModel, open_version

log = logging.getLogger(__name__)


class ModelState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"
    #: unloaded after its keep-alive to save memory and energy; the next request reloads it
    UNLOADED = "unloaded"


class RegistryEventKind(StrEnum):
    #: what listings show of a name changed (loading, ready, unloaded, failed, gone)
    STATUS = "status"
    STAGED = "staged"
    ACTIVE = "active"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"


@dataclass(frozen=True)
class RegistryEvent:
    """A version of a model changed role: loaded beside (staged), serving (active), refused
    (failed) or replaced by the one before it (rolled back); or a name's status changed."""

    kind: RegistryEventKind
    name: str
    version: str | None
    previous: str | None = None
    reason: str | None = None
    at: float = field(default_factory=time.time)


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
        #: versions opened beside the serving one (staged, not yet committed or discarded)
        self._staged: set[ServedModel] = set()
        #: opens still running in their thread; shutdown waits for them and closes what they open
        self._opening: set[asyncio.Task[ServedModel]] = set()
        self._observers: list[Callable[[RegistryEvent], None]] = []
        #: name -> seconds idle before an unload (absent or 0: stays loaded)
        self.keep_alive_s: dict[str, float] = {}
        #: name -> the keep-alive its last request asked for (Ollama's `keep_alive`: seconds,
        #: negative: forever); wins over `keep_alive_s` until the agent restarts
        self.keep_alive_requested: dict[str, float] = {}
        self._idle: dict[str, ModelBundle] = {}
        self._reloading: dict[str, asyncio.Task[ServedModel]] = {}

    def subscribe(self, callback: Callable[[RegistryEvent], None]) -> Callable[[], None]:
        """Call `callback` on the loop for every registry event: each step of an update
        (staged, active, failed, rolled back) and every change of a name's status (load,
        swap, unload, failure), so the MQTT state message and listings follow without
        polling. Returns an unsubscribe."""
        self._observers.append(callback)
        return lambda: self._observers.remove(callback) if callback in self._observers else None

    def _emit(self, event: RegistryEvent) -> None:
        for callback in list(self._observers):
            try:
                callback(event)
            except Exception:  # an observer's bug must not change what serves
                log.exception("registry observer failed on %s", event)

    def _changed(self, name: str) -> None:
        status = self._status.get(name)
        self._emit(RegistryEvent(RegistryEventKind.STATUS, name, status.version if status else None))

    async def _open(self, bundle: ModelBundle) -> ServedModel:
        """Open a version through `open_version`, the one path for every load. If the caller
        is cancelled (shutdown) the load goes on in its thread; `close` waits for it and
        closes what it opened."""
        usage = self._usage.setdefault(bundle.name, ModelUsage())
        task = asyncio.ensure_future(open_version(bundle, self._machine, self._max_pending,
                                                  self._limits_for(bundle.name), usage))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._unload_orphan)
            raise

    def _unload_orphan(self, task: asyncio.Task[ServedModel]) -> None:
        """A version whose opener was cancelled (shutdown, a stopped update) is unloaded as soon
        as its load ends: nobody else holds it."""
        if not task.cancelled() and task.exception() is None:
            self._retire(task.result())

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

    def keep_alive_for(self, name: str) -> float:
        """Seconds `name` may stay idle before it is unloaded; 0: it stays loaded."""
        asked = self.keep_alive_requested.get(name)
        if asked is None:
            return self.keep_alive_s.get(name, 0.0)
        return 0.0 if asked < 0 else asked

    def set_keep_alive(self, name: str, seconds: float) -> None:
        """A request's keep-alive for `name` (Ollama's): seconds idle before an unload, negative:
        forever, 0: unload as soon as nothing runs (`release_when_idle`, called after the request)."""
        self.keep_alive_requested[name] = seconds

    def release_when_idle(self, name: str) -> None:
        """Unload `name` now if nothing is admitted on it (keep_alive 0), in a task the registry
        owns (`close` waits for it); it stays listed as ``unloaded`` and reloads on demand."""
        served = self._serving.get(name)
        if served is None:
            return
        task = asyncio.create_task(self._release(name, served), name=f"release:{name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _release(self, name: str, served: ServedModel) -> None:
        await self._unload_if_idle(name, served, 0.0, time.monotonic())

    async def unload_idle(self, now: float | None = None) -> list[str]:
        """Unload every model idle (nothing admitted) longer than its keep-alive; it stays
        listed as ``unloaded`` and reloads on its next request. Returns the names unloaded."""
        now = time.monotonic() if now is None else now
        done = []
        for name, served in list(self._serving.items()):
            keep = self.keep_alive_for(name)
            if keep <= 0 or served.scheduler.depth or now - served.usage.last_active < keep:
                continue
            if await self._unload_if_idle(name, served, keep, now):
                done.append(name)
        return done

    async def _unload_if_idle(self, name: str, served: ServedModel, keep: float, now: float) -> bool:
        async with self._locks.setdefault(name, asyncio.Lock()):
            if self._serving.get(name) is not served or served.scheduler.depth:
                return False
            del self._serving[name]
            self._idle[name] = served.bundle  # from now on a request waits for a reload, never fails
            self._set_status(served.bundle, ModelState.UNLOADING)
            await self._shutdown(served)
            served.usage.idle_unloads += 1
            self._set_status(served.bundle, ModelState.UNLOADED, served=served)  # listings keep its card
            log.info("model %s: unloaded after %.0fs idle (keep-alive %.0fs)", name,
                     max(0.0, now - served.usage.last_active), keep)
            return True

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
                served = await self._open(bundle)
            except RuntimeLayerError as exc:
                self._load_failed(bundle, previous, str(exc))
                raise
            usage = served.usage
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

    async def stage(self, bundle: ModelBundle) -> ServedModel:
        """Load `bundle` beside whatever serves its name; it takes no requests until `commit`."""
        async with self._locks.setdefault(bundle.name, asyncio.Lock()):
            started = time.monotonic()
            try:
                staged = await self._open(bundle)
            except RuntimeLayerError as exc:
                self._emit(RegistryEvent(RegistryEventKind.FAILED, bundle.name, bundle.version, reason=str(exc)))
                raise
            self._staged.add(staged)
            log.info("model %s version %s staged in %.2fs", bundle.name, bundle.version, time.monotonic() - started)
            serving = self._serving.get(bundle.name)
            self._emit(RegistryEvent(RegistryEventKind.STAGED, bundle.name, bundle.version,
                                     serving.version if serving else None))
            return staged

    async def probe(self, served: ServedModel) -> str:
        """The model's smoke test on a staged or serving version."""
        return await served.probe()

    async def commit(self, staged: ServedModel) -> ServedModel | None:
        """Make a staged version serve (one dict assignment: in-flight requests finish on the
        old one, new ones go to the new). The old one stays loaded until `confirm`."""
        async with self._locks.setdefault(staged.name, asyncio.Lock()):
            previous = self._serving.get(staged.name)
            self._staged.discard(staged)
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
            self._staged.discard(target)
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
        self._staged.discard(staged)
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
        """Unload everything (agent shutdown): what serves, what is kept warm, what is staged
        and what is still being opened, so no native model outlives the event loop."""
        for name in list(self._serving):
            await self.unload(name)
        for name in list(self._warm):
            self._retire_warm(name)
        if self._opening:  # loads under way in their threads; what they open is unloaded as orphans
            await asyncio.gather(*self._opening, return_exceptions=True)
        while self._staged:
            await self._shutdown(self._staged.pop())
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    def expect(self, name: str, path: str) -> None:
        """A configured name about to load: listed as ``loading`` from now on (so a client
        sees every configured model right after start), unless it has a status already."""
        if name not in self._status:
            self._status[name] = ModelStatus(name=name, state=ModelState.LOADING, version=None, path=path)
            self._changed(name)

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
        await served.close(self._drain_timeout_s)

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
