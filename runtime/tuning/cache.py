"""The cached tuning result of each model: ``<state_dir>/tuning/<model>.json``.

One file per model name holds the last measurement: the fingerprint it was made for, the
table of candidates with their figures and the choice. It is written with
`write_file_atomic` (temporary name, fsync, rename), so a tuning run stopped at any point
(SIGTERM, power loss) leaves the previous file or none, never half a file. A file whose
fingerprint no longer matches the machine, the llama.cpp build or the model file is stale:
loaders ignore it and the agent measures again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from runtime.bundle import ModelBundle
from runtime.files import write_file_atomic

from .fingerprint import fingerprint, machine_parts, model_digest
from .settings import Choice, TunedSettings

log = logging.getLogger(__name__)

SCHEMA = "edgefleet.tuning/1"


class Freshness(StrEnum):
    FRESH = "fresh"
    STALE = "stale"
    MISSING = "missing"
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class CacheState:
    """A model's cache file as found, and whether it applies to this machine and model file."""

    freshness: Freshness
    record: dict[str, Any] | None
    #: this machine's fingerprint for the model (None when there is no record, or the model
    #: file cannot be read)
    fingerprint: str | None
    detail: str = ""

    def choice(self) -> Choice | None:
        """The cached choice when it applies here; None when it does not, or the record's choice
        is not one (a file edited by hand: logged, the model loads on its defaults)."""
        if self.freshness is not Freshness.FRESH or self.record is None or not self.record.get("choice"):
            return None
        try:
            return Choice(TunedSettings.from_json(self.record["choice"]), str(self.record["fingerprint"]),
                          float(self.record["tuned_at"]))
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("the cached tuning's choice is not usable (%s: %s); default settings",
                        type(exc).__name__, exc)
            return None


def cache_path(tuning_dir: Path, name: str) -> Path:
    return Path(tuning_dir) / f"{name}.json"


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at `path`, None when there is none; raises ValueError when it is unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a tuning record of schema {SCHEMA}")
    return data


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write `record` so that an interrupted write leaves the previous file (or none)."""
    write_file_atomic(path, (json.dumps({"schema": SCHEMA, **record}, indent=1, sort_keys=True) + "\n").encode())


def cache_state(tuning_dir: Path, bundle: ModelBundle) -> CacheState:
    """Whether `bundle`'s cached choice applies here (blocking: may hash the model file)."""
    path = cache_path(tuning_dir, bundle.name)
    try:
        record = read_record(path)
    except ValueError as exc:
        return CacheState(Freshness.UNREADABLE, None, None, str(exc))
    if record is None:  # nothing to compare: the model file is not hashed
        return CacheState(Freshness.MISSING, None, None, "not measured yet")
    try:
        digest = model_digest(bundle.weights, record.get("model"))
    except OSError as exc:
        return CacheState(Freshness.UNREADABLE, record, None, f"cannot read {bundle.weights}: {exc.strerror}")
    current = fingerprint(machine_parts(), digest)
    if record.get("fingerprint") != current:
        return CacheState(Freshness.STALE, record, current, _what_changed(record, digest))
    return CacheState(Freshness.FRESH, record, current)


def _what_changed(record: dict[str, Any], digest: str) -> str:
    """Which part of the fingerprint differs, for the log and doctor."""
    model = record.get("model")
    if not isinstance(model, dict) or model.get("sha256") != digest:
        return "the model file changed"
    old, new = record.get("machine"), machine_parts().to_json()
    old = old if isinstance(old, dict) else {}
    changed = [key for key in new if old.get(key) != new[key]]
    return f"the machine or llama.cpp build changed ({', '.join(changed) or 'fingerprint'})"


@dataclass(frozen=True)
class CachedTuning:
    """The loaders' `TuningSource`: the fresh cached choice for a bundle, if any."""

    tuning_dir: Path

    def choice_for(self, bundle: ModelBundle) -> Choice | None:
        state = cache_state(self.tuning_dir, bundle)
        if state.freshness in (Freshness.STALE, Freshness.UNREADABLE):
            log.info("%s: cached tuning not used: %s", bundle.name, state.detail)
        return state.choice()
