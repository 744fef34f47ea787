"""When the agent tunes: which models, and what happens to a model that serves meanwhile.

`tune_if_stale` measures a model whose cached choice is missing or stale (another machine,
llama.cpp build or model file) and never raises: a failed search is logged and the model
keeps its defaults. `TuningWorker` is the agent's background half: after the configured
models are loaded (READY), and again whenever a version becomes active (an update, a
reload), it tunes what is stale and reloads a model whose choice differs from what it
runs, through the registry's ordinary swap (the old version serves until the new is ready).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from runtime.bundle import ModelBundle
from runtime.devices import MachineSettings
from runtime.registry import ModelRegistry, RegistryEvent, RegistryEventKind

from .cache import Freshness, cache_state
from .search import TuneOptions, differs, tune_model
from .settings import AppliedTuning, TunedSettings

log = logging.getLogger(__name__)

#: Tasks whose speed is tuned (embedding GGUF models read prompts only; they keep their defaults).
TUNABLE_TASKS = ("chat", "completion")


def tunable(bundle: ModelBundle) -> bool:
    return bundle.manifest.format == "gguf" and bundle.manifest.task in TUNABLE_TASKS


async def tune_if_stale(bundle: ModelBundle, machine: MachineSettings, tuning_dir: Path,
                        options: TuneOptions) -> dict[str, Any] | None:
    """Measure `bundle` when its cached choice does not apply here; the new record, or None
    when nothing was measured (fresh already, or the search failed: logged, never raised)."""
    try:
        state = await asyncio.to_thread(cache_state, tuning_dir, bundle)
        if state.freshness is Freshness.FRESH:
            return None
        log.info("%s: measuring llama.cpp settings on this machine (%s)", bundle.name, state.detail)
        return await tune_model(bundle, machine, tuning_dir, options)
    except asyncio.CancelledError:
        raise
    except Exception:  # a bug or an OS error in tuning must never take the agent down
        log.exception("%s: tuning failed; the model keeps its default settings", bundle.name)
        return None


class TuningWorker:
    """The background tuner of one agent: owned by the registry's cleanup context, which
    starts it after the load task and cancels it (and so its measuring child) at shutdown."""

    def __init__(self, models: ModelRegistry, machine: MachineSettings, tuning_dir: Path,
                 options: TuneOptions) -> None:
        self._models, self._machine, self._dir, self._options = models, machine, tuning_dir, options
        self._wake: asyncio.Queue[str] = asyncio.Queue()
        self._unsubscribe = models.subscribe(self._on_event)
        self._task: asyncio.Task[None] | None = None

    def _on_event(self, event: RegistryEvent) -> None:
        if event.kind is RegistryEventKind.ACTIVE:
            self._wake.put_nowait(event.name)

    def start(self, loaded: asyncio.Task[Any]) -> None:
        self._task = asyncio.create_task(self._run(loaded), name="tuning")

    async def _run(self, loaded: asyncio.Task[Any]) -> None:
        await asyncio.wait([loaded])  # READY first: tuning never delays serving
        for loaded_model in self._models.serving():
            self._wake.put_nowait(loaded_model.name)
        while True:
            name = await self._wake.get()
            served = next((s for s in self._models.serving() if s.name == name), None)
            if served is None or not tunable(served.bundle):
                continue
            record = await tune_if_stale(served.bundle, self._machine, self._dir, self._options)
            if record is None:
                continue
            applied = getattr(served.backend, "tuning", None)
            running = applied.settings if applied is not None else TunedSettings.from_json(record["default"])
            if not differs(record, running):
                if record.get("choice") is not None:  # it runs the choice already: say so (metrics, doctor)
                    served.backend.tuning = AppliedTuning(  # type: ignore[attr-defined]
                        running, record["fingerprint"], record["tuned_at"], tuple(record["pinned"]))
                continue
            if served in self._models.serving():
                log.info("%s: reloading with the settings measured on this machine", name)
                try:
                    await self._models.load(served.bundle)
                except Exception:  # the old version keeps serving; the registry logged why
                    log.exception("%s: reload with tuned settings failed", name)

    async def stop(self) -> None:
        self._unsubscribe()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
