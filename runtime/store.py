"""The model store: the one owner of the on-disk layout under the state directory.

```
<state_dir>/
  store/<sha256>            content-addressed blobs, immutable once verified
  models/<name>/<version>/  one version: hard links (or copies) of blobs, by file name
  models/<name>/current     symlink to the version that serves, switched atomically
  staging/                  partial downloads, kept across restarts so they resume
  state.json                per model: current, confirmed (last good), previous, history
```

Every change is crash-safe: files and directories are written under temporary
names, fsynced, then renamed into place, and the directory holding them is
fsynced, so after a power loss each name is either the old thing or the new
thing. `recover()` clears what a crash can leave behind and points `current`
back at the last confirmed version when the one it names is not on disk.

The store knows files, hashes and versions, nothing of where they came from:
the demo builder and the signed-update client (sync/) both lay out versions
through `add_file` / `add_blob` and `lay_out`, and switch with `activate`.
Hashing and copying are blocking: async callers run them off the event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.bundle import MODEL_TOML, NAME_RE, ModelBundle, read_bundle
from runtime.errors import StoreError
from runtime.files import fsync_dir, sha256_file, write_file_atomic

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
#: A bundle's file name: one path component, no leading dot (so never `.`, `..` or a temp name).
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
STATE_SCHEMA = 1
#: History entries kept per model in state.json.
HISTORY_LIMIT = 50


def check_version(version: str) -> str:
    """A version is used as a directory name: same rule as model names."""
    if not NAME_RE.match(version) or version == "current":
        raise StoreError(f"invalid version {version!r}: use letters, digits, '.', '_' or '-'")
    return version


def check_file_name(name: str) -> str:
    if not FILE_NAME_RE.match(name):
        raise StoreError(f"invalid file name {name!r} in a bundle: one path component, no leading dot")
    return name


def check_sha256(digest: str) -> str:
    if not SHA256_RE.match(digest):
        raise StoreError(f"invalid sha256 {digest!r}")
    return digest


@dataclass
class HistoryEntry:
    version: str
    event: str  # "activated", "confirmed", "rolled-back"
    at: float
    reason: str | None = None
    #: "rolled-back" only: the version rolled back from (never gone back to by a later rollback)
    from_version: str | None = None


@dataclass
class ModelRecord:
    """What state.json says about one model name."""

    #: version `current` points at (kept in step with the symlink)
    current: str | None = None
    #: last version that passed its health check: what a crash falls back to
    confirmed: str | None = None
    #: version that served before `current`, kept on disk for rollback
    previous: str | None = None
    #: file name -> sha256, per version laid out
    versions: dict[str, dict[str, str]] = field(default_factory=dict)
    history: list[HistoryEntry] = field(default_factory=list)


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    path: Path
    files: Mapping[str, str]


class ModelStore:
    """Blobs, versions and the `current` switch under one state directory."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.blobs = self.root / "store"
        self.models = self.root / "models"
        self.staging = self.root / "staging"
        self.state_file = self.root / "state.json"
        self._lock = threading.RLock()

    # ---- directories and state.json -------------------------------------------------

    def ensure_layout(self) -> None:
        for directory in (self.root, self.blobs, self.models, self.staging):
            directory.mkdir(parents=True, exist_ok=True)

    def _read_state(self) -> dict[str, ModelRecord]:
        try:
            raw = json.loads(self.state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StoreError(f"{self.state_file}: unreadable ({exc}); move it aside to start afresh") from None
        records: dict[str, ModelRecord] = {}
        for name, data in raw.get("models", {}).items():
            history = [HistoryEntry(**entry) for entry in data.get("history", [])]
            records[name] = ModelRecord(
                current=data.get("current"),
                confirmed=data.get("confirmed"),
                previous=data.get("previous"),
                versions={v: dict(files) for v, files in data.get("versions", {}).items()},
                history=history,
            )
        return records

    def _write_state(self, records: dict[str, ModelRecord]) -> None:
        body = {"schema": STATE_SCHEMA, "models": {name: asdict(rec) for name, rec in sorted(records.items())}}
        write_file_atomic(self.state_file, json.dumps(body, indent=1, sort_keys=True).encode())

    def record(self, name: str) -> ModelRecord:
        """A copy of what state.json holds for `name` (empty when unknown)."""
        with self._lock:
            return self._read_state().get(name, ModelRecord())

    def names(self) -> list[str]:
        """Model names with a `current` version on disk."""
        if not self.models.is_dir():
            return []
        return sorted(p.name for p in self.models.iterdir() if (p / "current").is_symlink() and NAME_RE.match(p.name))

    # ---- blobs --------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / check_sha256(sha256)

    def has_blob(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def staging_path(self, sha256: str) -> Path:
        """Where a download of blob `sha256` accumulates (kept across restarts to resume)."""
        self.staging.mkdir(parents=True, exist_ok=True)
        return self.staging / f"{check_sha256(sha256)}.part"

    def add_blob(self, source: Path, sha256: str) -> Path:
        """Move a file whose sha256 the caller has verified into the store (fsync + rename)."""
        target = self.blob_path(sha256)
        if target.is_file():
            source.unlink(missing_ok=True)
            return target
        self.blobs.mkdir(parents=True, exist_ok=True)
        fd = os.open(source, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(source, target)
        fsync_dir(self.blobs)
        return target

    def add_file(self, source: Path, expected_sha256: str | None = None) -> str:
        """Hash `source` and place it in the store (hard link when possible, else a copy).
        The source is left where it is. Returns its sha256."""
        digest = sha256_file(source)
        if expected_sha256 is not None and digest != expected_sha256:
            raise StoreError(f"{source}: sha256 {digest} does not match the expected {expected_sha256}")
        target = self.blob_path(digest)
        if target.is_file():
            return digest
        temp = self.blobs / f".tmp-{digest}-{os.getpid()}"
        with self._no_partial_file(temp, f"cannot add {source.name} to the store"):
            self.blobs.mkdir(parents=True, exist_ok=True)
            temp.unlink(missing_ok=True)
            try:
                os.link(source, temp)
            except OSError:
                shutil.copyfile(source, temp)
            self.add_blob(temp, digest)
        return digest

    def add_bytes(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if not self.has_blob(digest):
            temp = self.blobs / f".tmp-{digest}-{os.getpid()}"
            with self._no_partial_file(temp, "cannot add a file to the store"):
                self.blobs.mkdir(parents=True, exist_ok=True)
                temp.write_bytes(data)
                self.add_blob(temp, digest)
        return digest

    @contextlib.contextmanager
    def _no_partial_file(self, temp: Path, what: str) -> Iterator[None]:
        """A copy that fails (a full disk) leaves no temp file behind, and says why in one line."""
        try:
            yield
        except BaseException as exc:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StoreError(f"{what} in {self.blobs}: {exc.strerror or exc}") from exc
            raise

    def verify_blob(self, sha256: str) -> bool:
        """Re-hash a blob (after a crash, or when in doubt)."""
        path = self.blob_path(sha256)
        return path.is_file() and sha256_file(path) == sha256

    # ---- versions -----------------------------------------------------------------

    def version_path(self, name: str, version: str) -> Path:
        return self.models / _check_name(name) / check_version(version)

    def lay_out(self, name: str, version: str, files: Mapping[str, str]) -> VersionInfo:
        """Make models/<name>/<version>/ hold exactly `files` (file name -> sha256 of a blob).

        Built in a temporary directory and renamed into place, so the version
        directory is complete or absent. An existing directory with the same
        files is kept; one with other files is replaced, unless it serves."""
        _check_name(name)
        check_version(version)
        files = {check_file_name(f): check_sha256(sha) for f, sha in files.items()}
        if MODEL_TOML not in files:
            raise StoreError(f"{name} {version}: a version needs a {MODEL_TOML}")
        missing = [f for f, sha in files.items() if not self.has_blob(sha)]
        if missing:
            raise StoreError(f"{name} {version}: blobs missing from the store for {', '.join(missing)}")
        with self._lock:
            model_dir = self.models / name
            target = model_dir / version
            records = self._read_state()
            record = records.setdefault(name, ModelRecord())
            if target.is_dir() and self._same_files(target, files):
                if record.versions.get(version) != files:
                    record.versions[version] = dict(files)
                    self._write_state(records)
                return VersionInfo(name, version, target, files)
            if target.exists() and version in (self.current(name), record.confirmed):
                raise StoreError(f"{name} {version} serves with other files; publish a new version instead")
            model_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
            try:
                for file_name, sha in files.items():
                    _link_or_copy(self.blob_path(sha), staging / file_name)
                staging.chmod(0o755)
                fsync_dir(staging)
                if target.exists():
                    old = model_dir / f".old-{version}-{os.getpid()}"
                    os.replace(target, old)
                    shutil.rmtree(old, ignore_errors=True)
                os.replace(staging, target)
                fsync_dir(model_dir)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            record.versions[version] = dict(files)
            self._write_state(records)
            return VersionInfo(name, version, target, files)

    def _same_files(self, directory: Path, files: Mapping[str, str]) -> bool:
        present = {p.name for p in directory.iterdir()}
        if present != set(files):
            return False
        for file_name, sha in files.items():
            blob = self.blob_path(sha)
            try:
                if not os.path.samefile(directory / file_name, blob) and sha256_file(directory / file_name) != sha:
                    return False
            except OSError:
                return False
        return True

    def versions(self, name: str) -> list[str]:
        """Versions on disk for `name`."""
        model_dir = self.models / _check_name(name)
        if not model_dir.is_dir():
            return []
        return sorted(
            p.name for p in model_dir.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
        )

    def has_version(self, name: str, version: str) -> bool:
        return (self.version_path(name, version) / MODEL_TOML).is_file()

    def verify_version(self, name: str, version: str) -> bool:
        """Every file of the version hashes to what was laid out (re-reads the bytes)."""
        files = self.record(name).versions.get(version)
        path = self.version_path(name, version)
        if not files or not path.is_dir():
            return False
        try:
            return {p.name for p in path.iterdir()} == set(files) and all(
                sha256_file(path / f) == sha for f, sha in files.items()
            )
        except OSError:
            return False

    def bundle(self, name: str, version: str | None = None) -> ModelBundle:
        """The bundle of `version` (default: current), parsed."""
        if version is None:
            return read_bundle(self.models / _check_name(name) / "current", name=name)
        return read_bundle(self.version_path(name, version), name=name)

    # ---- the switch ---------------------------------------------------------------

    def current(self, name: str) -> str | None:
        link = self.models / _check_name(name) / "current"
        try:
            return os.readlink(link)
        except OSError:
            return None

    def activate(self, name: str, version: str, reason: str | None = None) -> str | None:
        """Point `current` at `version` (atomic symlink replace); returns the version it replaced,
        which becomes `previous` and stays on disk for rollback."""
        if not self.has_version(name, version):
            raise StoreError(f"{name} {version} is not laid out in the store")
        with self._lock:
            records = self._read_state()
            record = records.setdefault(name, ModelRecord())
            old = self.current(name)
            self._switch_link(name, version)
            if old is not None and old != version:
                record.previous = old
            record.current = version
            if record.confirmed is None:
                record.confirmed = version
            _append(record, HistoryEntry(version, "activated", time.time(), reason))
            self._write_state(records)
            return old

    def confirm(self, name: str, version: str) -> None:
        """`version` passed its health check: it is what a crash falls back to from now on."""
        with self._lock:
            records = self._read_state()
            record = records.setdefault(name, ModelRecord())
            if record.confirmed != version:
                record.confirmed = version
                _append(record, HistoryEntry(version, "confirmed", time.time()))
                self._write_state(records)

    def roll_back(self, name: str, reason: str, skip: Collection[str] = ()) -> str:
        """Serve again the last version that served well before the current one; returns it.

        "Served well": it was confirmed, rolled back to, or served until a newer version
        was activated over it; and it was not rolled back from since. So a second rollback
        goes further back instead of bringing back the version just rolled back from.
        `skip` names versions the caller will not have (sync/'s deny list). The version
        rolled back from stays on disk until pruned."""
        with self._lock:
            records = self._read_state()
            record = records.get(name)
            current = self.current(name)
            if record is None and current is None:
                raise StoreError(f"There is no model named {name} in the model store.")
            record = records.setdefault(name, ModelRecord())
            target = next(
                (v for v in served_well(record, current) if v not in skip and self.has_version(name, v)), None
            )
            if target is None:
                raise StoreError(
                    f"{name} has no earlier version that served well left to go back to: {current or 'nothing'} "
                    "is the last one (versions rolled back from, and versions denied until the hub publishes "
                    "them anew, are not gone back to)."
                )
            self._switch_link(name, target)
            record.previous = current
            record.current = target
            record.confirmed = target
            _append(record, HistoryEntry(target, "rolled-back", time.time(), reason, from_version=current))
            self._write_state(records)
            return target

    def _switch_link(self, name: str, version: str) -> None:
        model_dir = self.models / name
        temp = model_dir / f".current-{os.getpid()}.tmp"
        temp.unlink(missing_ok=True)
        temp.symlink_to(version)
        os.replace(temp, model_dir / "current")
        fsync_dir(model_dir)

    # ---- upkeep -------------------------------------------------------------------

    def recover(self) -> list[str]:
        """After a crash: drop half-built versions and temp links; make every `current`
        name a complete version, falling back to the confirmed one. Partial downloads in
        staging/ are kept (they resume). Returns what was repaired, for the log."""
        repaired: list[str] = []
        if self.blobs.is_dir():
            for temp in self.blobs.glob(".tmp-*"):
                temp.unlink(missing_ok=True)
        if not self.models.is_dir():
            return repaired
        with self._lock:
            records = self._read_state()
            changed = False
            for model_dir in sorted(p for p in self.models.iterdir() if p.is_dir()):
                for leftover in model_dir.glob(".*"):
                    if leftover.is_dir() and not leftover.is_symlink():
                        shutil.rmtree(leftover, ignore_errors=True)
                    else:
                        leftover.unlink(missing_ok=True)
                    repaired.append(f"removed {leftover}")
                name = model_dir.name
                record = records.get(name)
                current = self.current(name) if NAME_RE.match(name) else None
                if current is not None and (model_dir / current / MODEL_TOML).is_file():
                    if record is not None and record.current != current:
                        record.current = current
                        changed = True
                    continue
                if record is None:
                    continue
                fallback = next(
                    (v for v in (record.confirmed, record.previous) if v and (model_dir / v / MODEL_TOML).is_file()),
                    None,
                )
                if fallback is not None:
                    self._switch_link(name, fallback)
                    record.current = fallback
                    changed = True
                    repaired.append(f"{name}: current pointed at a missing version; back to {fallback}")
            if changed:
                self._write_state(records)
        return repaired

    def prune(self, name: str, keep: int = 2) -> list[str]:
        """Delete versions of `name` other than current, confirmed, previous and the `keep`
        most recently activated; then blobs no version uses. Returns removed versions."""
        with self._lock:
            records = self._read_state()
            record = records.get(name)
            if record is None:
                return []
            recent: list[str] = []
            for entry in reversed(record.history):
                if entry.version not in recent:
                    recent.append(entry.version)
            kept = {v for v in (self.current(name), record.confirmed, record.previous) if v} | set(recent[:keep])
            removed = [v for v in self.versions(name) if v not in kept]
            for version in removed:
                shutil.rmtree(self.models / name / version, ignore_errors=True)
                record.versions.pop(version, None)
            if removed:
                self._write_state(records)
            self._collect_blobs(records)
            return removed

    def remove(self, name: str, version: str | None = None) -> list[str]:
        """Delete `version` of `name` (every version, and the name, when None), then the blobs
        no version uses. Removing the current version leaves the name without one (it does
        not serve). The caller makes sure nothing serves what goes. Returns removed versions."""
        model_dir = self.models / _check_name(name)
        with self._lock:
            records = self._read_state()
            record = records.get(name, ModelRecord())
            if version is not None and not self.version_path(name, version).is_dir():
                raise StoreError(f"{name} has no version {version} in the store")
            targets = [version] if version is not None else self.versions(name)
            if version is None or self.current(name) == version:
                (model_dir / "current").unlink(missing_ok=True)
            for gone in targets:
                old = model_dir / f".old-{gone}-{os.getpid()}"
                os.replace(model_dir / gone, old)
                shutil.rmtree(old, ignore_errors=True)
                record.versions.pop(gone, None)
                for role in ("current", "confirmed", "previous"):
                    if getattr(record, role) == gone:
                        setattr(record, role, None)
            if version is None or not self.versions(name):
                records.pop(name, None)
                shutil.rmtree(model_dir, ignore_errors=True)
                fsync_dir(self.models)
            elif name in records or record.versions:
                records[name] = record
                fsync_dir(model_dir)
            self._write_state(records)
            self._collect_blobs(records)
            return targets

    def _collect_blobs(self, records: Mapping[str, ModelRecord]) -> None:
        used = {sha for rec in records.values() for files in rec.versions.values() for sha in files.values()}
        if not self.blobs.is_dir():
            return
        for blob in self.blobs.iterdir():
            if SHA256_RE.match(blob.name) and blob.name not in used:
                blob.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        self.ensure_layout()
        return shutil.disk_usage(self.root).free

    def iter_records(self) -> Iterator[tuple[str, ModelRecord]]:
        with self._lock:
            yield from sorted(self._read_state().items())

    def to_json(self) -> dict[str, Any]:
        """state.json's content, for status output."""
        return {name: asdict(rec) for name, rec in self.iter_records()}


def _check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise StoreError(f"invalid model name {name!r}")
    return name


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def served_well(record: ModelRecord, current: str | None) -> list[str]:
    """Versions of one model that served well, most recent first, `current` left out: each
    version confirmed, rolled back to, or activated (and so served until the next switch),
    unless it was rolled back from after that. The confirmed and previous versions come
    last, for histories cut at HISTORY_LIMIT."""
    found: list[str] = []
    rolled_back_from: set[str] = set()
    history = record.history
    for i in range(len(history) - 1, -1, -1):
        entry = history[i]
        if entry.event == "rolled-back":
            source = entry.from_version or next(  # entries written before from_version was kept
                (e.version for e in reversed(history[:i]) if e.version != entry.version), None)
            if source is not None:
                rolled_back_from.add(source)
        if entry.version not in rolled_back_from and entry.version not in found:
            found.append(entry.version)
    for version in (record.confirmed, record.previous):
        if version and version not in rolled_back_from and version not in found:
            found.append(version)
    return [v for v in found if v != current]


def _append(record: ModelRecord, entry: HistoryEntry) -> None:
    record.history.append(entry)
    del record.history[:-HISTORY_LIMIT]
