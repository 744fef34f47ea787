"""The agent's side of per-machine tuning (runtime/tuning/): the config's `[tuning]` turned
into a cache the loads read, a search before READY, or a worker after it.

`[tuning] mode`: "before_ready" measures the configured GGUF models whose cached choice is
missing or stale before they load (READY waits for it); "background" (the default) loads
them at once with what is cached and measures after READY, reloading a model whose choice
differs; "off" measures nothing. In every mode a fresh cached choice is applied at load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from runtime.bundle import read_bundle
from runtime.devices import MachineSettings
from runtime.errors import RuntimeLayerError
from runtime.registry import ModelRegistry
from runtime.tuning.cache import CachedTuning
from runtime.tuning.search import TuneOptions
from runtime.tuning.service import TuningWorker, tunable, tune_if_stale

log = logging.getLogger(__name__)


def tuning_dir(config: AgentConfig) -> Path:
    return Path(config.state_dir) / "tuning"


def tuning_source(config: AgentConfig) -> CachedTuning:
    """What GGUF loads read their tuned settings from."""
    return CachedTuning(tuning_dir(config))


def tune_options(config: AgentConfig) -> TuneOptions:
    settings = config.tuning
    return TuneOptions(budget_s=settings.budget_s, candidate_timeout_s=settings.candidate_timeout_s,
                       knobs=tuple(settings.knobs) or None)


async def tune_then_load(config: AgentConfig, machine: MachineSettings,
                         load: Callable[[], Awaitable[None]]) -> None:
    """`[tuning] mode = "before_ready"`: measure the configured GGUF models that need it, then load."""
    from agent.fleet.updates import with_managed_models
    from agent.local_models import with_imported_models

    listed = with_imported_models(with_managed_models(config))
    for entry in listed.models:
        try:
            bundle = read_bundle(listed.bundle_path(entry), name=entry.name)
        except (RuntimeLayerError, OSError):
            continue  # the load reports it
        if tunable(bundle):
            await tune_if_stale(bundle, machine, tuning_dir(config), tune_options(config))
    await load()


def start_worker(config: AgentConfig, machine: MachineSettings, models: ModelRegistry,
                 loaded: asyncio.Task[Any]) -> TuningWorker | None:
    """The background tuner (not with mode "off"); the caller stops it before the registry closes."""
    if config.tuning.mode == "off":
        return None
    worker = TuningWorker(models, machine, tuning_dir(config), tune_options(config))
    worker.start(loaded)
    return worker


async def stop_worker(worker: TuningWorker | None) -> None:
    if worker is not None:
        with contextlib.suppress(Exception):
            await worker.stop()
