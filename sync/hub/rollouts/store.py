"""Rollout records on disk: ``<hub>/rollouts/<id>.json``, one writer at a time.

Every change (the CLI's start, pause, resume, abort; the controller's advance,
complete, abort) is read-modify-write under an exclusive flock on
``<hub>/rollouts/.lock`` and lands by atomic rename with fsync
(runtime/files.py), so a record survives a restart of the controller or of the
machine, and two writers never lose each other's change. Readers (`status`) do
not lock: a rename is atomic, they see the old record or the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from runtime.files import write_file_atomic
from security.desired import NAME_RE

from ...errors import HubError
from .record import RolloutRecord

#: the controller's own counters (messages ignored, and why), for `hub rollout status`
CONTROLLER_FILE = "controller.json"
#: device -> {"online", "since"} on the hub's clock, for `hub status` (how long offline)
PRESENCE_FILE = "presence.json"


class RolloutStore:
    def __init__(self, hub_dir: Path) -> None:
        self.dir = Path(hub_dir) / "rollouts"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def path(self, rollout_id: str) -> Path:
        if not NAME_RE.match(rollout_id):
            raise HubError(f"{rollout_id!r} is not a rollout id (e.g. r-3f9a2c)")
        return self.dir / f"{rollout_id}.json"

    def load(self, rollout_id: str) -> RolloutRecord:
        try:
            data = self.path(rollout_id).read_bytes()
        except FileNotFoundError:
            known = ", ".join(r.id for r in self.all()) or "none"
            raise HubError(f"no rollout {rollout_id} in {self.dir} (known: {known})") from None
        return RolloutRecord.from_json(data)

    def save(self, record: RolloutRecord) -> None:
        write_file_atomic(self.path(record.id), record.to_json())

    def all(self) -> list[RolloutRecord]:
        """Every readable record, oldest first."""
        records = []
        for path in sorted(self.dir.glob("r-*.json")) if self.dir.is_dir() else []:
            with contextlib.suppress(OSError, HubError):
                records.append(RolloutRecord.from_json(path.read_bytes()))
        return sorted(records, key=lambda r: (r.created_at, r.id))

    def active(self) -> list[RolloutRecord]:
        return [r for r in self.all() if not r.done]

    def save_controller(self, body: dict[str, Any]) -> None:
        write_file_atomic(self.dir / CONTROLLER_FILE, json.dumps(body, indent=1, sort_keys=True).encode())

    def controller(self) -> dict[str, Any] | None:
        return self._read(CONTROLLER_FILE)

    def save_presence(self, body: dict[str, Any]) -> None:
        write_file_atomic(self.dir / PRESENCE_FILE, json.dumps(body, sort_keys=True).encode())

    def presence(self) -> dict[str, Any] | None:
        return self._read(PRESENCE_FILE)

    def _read(self, name: str) -> dict[str, Any] | None:
        try:
            body = json.loads((self.dir / name).read_bytes())
        except (OSError, ValueError):
            return None
        return body if isinstance(body, dict) else None
