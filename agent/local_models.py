"""Models imported without a hub (`edgefleet models import` / `pull`) serve beside the config's.

An imported name is recorded in ``<state_dir>/imported.json`` (runtime/importer.py); the agent
serves it as if ``[[models]]`` listed it with default settings (``name`` only: the store's
``current`` version, no keep-alive, an equal share of the memory budget). Listing it in the
config as well gives it settings; `models rm` takes it off both the disk and this list.
"""

from __future__ import annotations

import logging

from agent.config import AgentConfig, ModelEntry
from runtime.errors import StoreError
from runtime.importer import imported_names
from runtime.store import ModelStore

log = logging.getLogger(__name__)


def with_imported_models(config: AgentConfig) -> AgentConfig:
    """`config` with an entry for each imported name it does not list and the store holds."""
    try:
        names = imported_names(config.state_dir)
    except StoreError as exc:  # an unreadable list must not stop the configured models
        log.error("imported models are not served: %s", exc)
        return config
    listed = {m.name for m in config.models}
    store = ModelStore(config.state_dir)
    extra = [n for n in names if n not in listed and store.current(n) is not None]
    if not extra:
        return config
    return config.with_overrides(models=[*config.models, *(ModelEntry(name=n) for n in extra)])
