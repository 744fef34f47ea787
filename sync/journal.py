"""The update journal: what sync/ must remember across a crash, in ``<state_dir>/sync/journal.json``.

- the desired-state serials last accepted (group and device), so an older
  desired state or an old doorbell is recognised;
- the update job of each model that has not reached a terminal state, with the
  step it reached and how many activations were interrupted (a version that
  keeps killing the agent is given up on);
- the deny list: versions that failed verification or their health check, not
  tried again until the desired state publishes that model's entry anew;
- the last transition published per model, so the retained update topic can be
  set right after a restart;
- the model names the last accepted desired state lists, which serve besides the
  config's ``[[models]]`` from the next start on, before the hub is reached.

Written atomically (temp file, fsync, rename) at every transition, before the
step it announces is taken.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.files import write_file_atomic

log = logging.getLogger(__name__)


@dataclass
class JobRecord:
    job_id: str
    model: str
    version: str
    from_version: str | None
    state: str
    serial: str
    attempts: int = 0
    reason: str | None = None


@dataclass
class DenyEntry:
    model: str
    version: str
    code: str
    message: str
    #: the serial of the model's desired entry when it was denied: a newer one lifts it
    serial: int


@dataclass
class JournalData:
    group_serial: int = 0
    device_serial: int = 0
    targets_version: int = 0
    jobs: dict[str, JobRecord] = field(default_factory=dict)
    deny: list[DenyEntry] = field(default_factory=list)
    #: model -> serial of its desired entry, as last seen
    entry_serials: dict[str, int] = field(default_factory=dict)
    #: the model names the last accepted desired state lists: with [[models]], what serves
    desired: list[str] = field(default_factory=list)
    #: model -> what the last accepted desired state says of it for this device (version,
    #: origin, rollout, serial): the reported state shows it after a restart, before a refresh
    desired_entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    last: dict[str, dict[str, Any]] = field(default_factory=dict)
    seq: int = 0

    @property
    def serial_key(self) -> str:
        return f"{self.group_serial}.{self.device_serial}"


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.data = self._load()

    def _load(self) -> JournalData:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return JournalData()
        except (OSError, ValueError) as exc:
            log.error("update journal %s unreadable (%s): starting a new one", self.path, exc)
            return JournalData()
        return JournalData(
            group_serial=int(raw.get("group_serial", 0)),
            device_serial=int(raw.get("device_serial", 0)),
            targets_version=int(raw.get("targets_version", 0)),
            jobs={k: JobRecord(**v) for k, v in raw.get("jobs", {}).items()},
            deny=[DenyEntry(**d) for d in raw.get("deny", [])],
            entry_serials={k: int(v) for k, v in raw.get("entry_serials", {}).items()},
            # journals from before `desired` was kept: every name a desired state ever listed
            desired=sorted(raw.get("desired", raw.get("entry_serials", {}))),
            desired_entries={k: dict(v) for k, v in raw.get("desired_entries", {}).items() if isinstance(v, dict)},
            last=dict(raw.get("last", {})),
            seq=int(raw.get("seq", 0)),
        )

    def save(self) -> None:
        write_file_atomic(self.path, json.dumps(asdict(self.data), indent=1, sort_keys=True).encode())

    def next_seq(self) -> int:
        self.data.seq += 1
        return self.data.seq

    def denied(self, model: str, version: str) -> DenyEntry | None:
        return next((d for d in self.data.deny if d.model == model and d.version == version), None)

    def deny(self, model: str, version: str, code: str, message: str) -> None:
        if self.denied(model, version) is None:
            serial = self.data.entry_serials.get(model, 0)
            self.data.deny.append(DenyEntry(model, version, code, message, serial))

    def see_entry(self, model: str, serial: int) -> None:
        """The desired entry of `model` as published now: a newer one lifts its denials."""
        self.data.entry_serials[model] = serial
        self.data.deny = [d for d in self.data.deny if d.model != model or d.serial >= serial]

    def accept_models(self, names: list[str]) -> None:
        """The names the desired state accepted now lists (with [[models]], what serves)."""
        self.data.desired = sorted(names)

    def accept_serials(self, group: int, device: int, targets_version: int) -> bool:
        """Record newly accepted desired serials; returns whether they changed."""
        changed = (group, device) != (self.data.group_serial, self.data.device_serial)
        self.data.group_serial, self.data.device_serial = group, device
        self.data.targets_version = max(self.data.targets_version, targets_version)
        return changed
