"""The audit log on disk: who did what, appended to a hash chain, sealed by signed checkpoints.

`AuditLog.record(actor, action, target, outcome, **detail)` never blocks and never raises:
it queues the record for the log's own writer thread, which appends each one as a single
``write`` of one JSON line, then fsyncs. A write the disk refuses (full, read-only, I/O
error) is cut back with ``ftruncate`` to where the file was, so no record is ever half
written; the record is dropped and counted (`dropped`), and the first record written again
after is ``audit.dropped`` with how many were lost and since when, so the chain itself says
so. A torn last line left by a crash or power cut (a write that never returned) is cut off
when the log opens, and an ``audit.repaired`` record says how many bytes went.

Every `checkpoint_every` records or `checkpoint_interval_s` seconds (and at `close`) a
checkpoint is signed with the device key (security/audit_chain.py says what it covers),
and kept beside the log in ``audit.checkpoint`` too, so a log cut short is seen. Past
`max_bytes` the file is sealed with a checkpoint and rotated (``audit.log.1``, … up to
`keep_files`); the new file starts with an ``audit.rotated`` record whose ``prev`` is the
last head, so the chain goes on across files.

Other processes (the keys CLI) append through `append_offline`; both sides take an
``flock`` on ``audit.lock`` around each append and read the chain's head from the file
when it grew under them, so their records never interleave or fork the chain.

The device key (``<state_dir>/device-key.pem``, 0600, security/device_key.py) is the agent's
Ed25519 identity; its public key goes into the MQTT birth message (agent/fleet/link.py). Given
as a `DeviceKey`, it is loaded (or made) at the first checkpoint, so an agent that has not
signed yet has not imported cryptography. A checkpoint the key cannot sign (the file is bad,
unreadable, or cannot be made) is lost like a record the disk refuses: counted in `dropped`,
logged, and the next record written is ``audit.dropped`` with the reason; the next try is a
whole checkpoint period later.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.files import write_file_atomic

from .audit_chain import CHECKPOINT, GENESIS, ROTATED, checkpoint_detail, line_of, make_record, parse_line
from .device_key import KEY_NAME, DeviceKey, load_or_create_device_key  # noqa: F401 - KEY_NAME, the loader: re-exported

if TYPE_CHECKING:  # imported when the key is loaded: `[audit]` settings alone do not need it
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)

LOG_NAME = "audit.log"
LOCK_NAME = "audit.lock"
CHECKPOINT_NAME = "audit.checkpoint"
#: A detail value longer than this is cut (with "…"); more keys than MAX_DETAIL_KEYS are dropped.
MAX_DETAIL_CHARS = 1024
MAX_DETAIL_KEYS = 16
#: How far back from the end the head is looked for (records are far smaller).
TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class AuditSettings:
    """``[audit]``: the tamper-evident audit log (docs/security.md#audit-log)."""

    enabled: bool = True
    #: where the log lives (default ``<state_dir>/audit``)
    dir: str | None = None
    #: a signed checkpoint after this many records...
    checkpoint_every: int = 100
    #: ...or this many seconds after the first record it does not seal yet
    checkpoint_interval_s: float = 300.0
    #: the current file is rotated past this size; `keep_files` rotated files are kept
    max_bytes: int = 10 * 1024 * 1024
    keep_files: int = 5
    #: records waiting for the writer thread; past it, records are dropped and counted
    queue_max: int = 10_000

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        if not 0.1 <= self.checkpoint_interval_s <= 86_400:
            raise ValueError("checkpoint_interval_s must be 0.1..86400")
        if self.max_bytes < 4096:
            raise ValueError("max_bytes must be at least 4096")
        if not 0 <= self.keep_files <= 1000:
            raise ValueError("keep_files must be 0..1000")
        if self.queue_max < 1:
            raise ValueError("queue_max must be at least 1")

    def directory(self, state_dir: str | Path) -> Path:
        return Path(self.dir) if self.dir else Path(state_dir) / "audit"


# ---- the file ------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """The cross-process lock around one append (the agent and the CLI)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@dataclass
class _Head:
    """Where the chain stands in the current file: its size, the last seq and hash."""

    size: int = 0
    seq: int = 0
    hash: str = GENESIS
    inode: int = 0


def _read_head(fd: int, repair: bool) -> tuple[_Head, int]:
    """The head of the file open as `fd`; with `repair`, a torn last line is cut off.
    Returns (head, bytes cut)."""
    size = os.fstat(fd).st_size
    start = max(0, size - TAIL_BYTES)
    tail = os.pread(fd, size - start, start)
    cut = 0
    if tail and not tail.endswith(b"\n"):
        keep = tail.rfind(b"\n") + 1
        cut = len(tail) - keep
        if repair:
            os.ftruncate(fd, start + keep)
            os.fsync(fd)
            size = start + keep
        tail = tail[:keep]
    lines = tail.splitlines(keepends=True)
    head = _Head(size=size, inode=os.fstat(fd).st_ino)
    for raw in reversed(lines):
        record = parse_line(raw)
        if record is not None:
            head.seq, head.hash = record["seq"], record["hash"]
            break
    return head, cut


def _clean_detail(detail: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted(detail)[:MAX_DETAIL_KEYS]:
        value = detail[key]
        if value is None or isinstance(value, (bool, int, float)):
            out[str(key)] = value
        else:
            text = str(value)
            out[str(key)] = text if len(text) <= MAX_DETAIL_CHARS else text[:MAX_DETAIL_CHARS] + "…"
    return out


def _append(fd: int, head: _Head, record: dict[str, Any]) -> _Head:
    """Write one line, fsync; on a refusal cut the file back and re-raise (OSError)."""
    line = line_of(record)
    try:
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync(fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, head.size)  # never a half-written record
        raise
    return _Head(head.size + len(line), record["seq"], record["hash"], head.inode)


def append_offline(state_dir: Path, actor: str, action: str, target: str, outcome: str,
                   directory: Path | None = None, **detail: Any) -> dict[str, Any]:
    """Append one record from another process (the keys CLI), under the same lock as the agent.
    Returns the record; raises OSError when the disk refuses it (nothing half written)."""
    directory = directory or AuditSettings().directory(state_dir)
    with _locked(directory):
        fd = os.open(directory / LOG_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            rfd = os.open(directory / LOG_NAME, os.O_RDWR)
            try:
                head, _ = _read_head(rfd, repair=True)
            finally:
                os.close(rfd)
            record = make_record(head.seq + 1, time.time(), actor, action, target, outcome, _clean_detail(detail),
                                 head.hash)
            _append(fd, head, record)
        finally:
            os.close(fd)
    return record


class AuditLog:
    """The agent's audit log: one writer thread, owned by whoever calls `open` and `close`."""

    def __init__(self, directory: Path, device: str, key: Ed25519PrivateKey | DeviceKey,
                 settings: AuditSettings | None = None, on_line: Callable[[bytes], None] | None = None) -> None:
        """`key`: the signing key, or a `DeviceKey` loaded at the first checkpoint.
        `on_line`: called on the writer thread with each line once it is on disk (forwarding)."""
        self.directory = directory
        self.path = directory / LOG_NAME
        self.device = device
        self.key = key
        #: why the last checkpoint could not be signed (None once one is)
        self.key_error: str | None = None
        self.settings = settings or AuditSettings()
        self.on_line = on_line
        #: records written, and those the disk refused (dropped, counted)
        self.written = 0
        self.dropped_disk = 0
        #: why the disk refuses records now (None while it takes them)
        self.error: str | None = None
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(self.settings.queue_max)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._head = _Head()
        self._since_checkpoint = 0
        self._first_unsealed: float | None = None
        self._lost = 0
        self._lost_since: float | None = None
        self._lost_reason = "the writer fell behind"
        self._overflow = 0
        #: of `dropped`, those the queue refused (the writer fell `queue_max` behind)
        self.dropped_queue = 0

    @property
    def dropped(self) -> int:
        """Records lost: refused by the disk, or by the queue (edgefleet_audit_dropped_total)."""
        return self.dropped_disk + self.dropped_queue

    # ---- what callers use ----------------------------------------------------------------

    def record(self, actor: str, action: str, target: str, outcome: str, **detail: Any) -> None:
        """Queue one record; never blocks, never raises (a full queue drops it and counts it)."""
        entry = (actor, action, target, outcome, _clean_detail(detail), time.time())
        if self._thread is None:  # not open (or closed): written here, at once
            with self._lock:
                self._write_entry(entry)
            return
        try:
            self._queue.put_nowait(("record", entry))
        except queue.Full:
            self._overflow += 1  # counted by the writer (which owns the figures) at its next record
            self.dropped_queue += 1

    def checkpoint(self) -> None:
        """Queue a signed checkpoint now (if any record is not sealed yet)."""
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(("checkpoint", None))

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until what was queued before the call is on disk; False on timeout."""
        if self._thread is None:
            return True
        done = threading.Event()
        try:
            self._queue.put(("flush", done), timeout=timeout_s)
        except queue.Full:
            return False
        return done.wait(timeout_s)

    # ---- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        """Open (or make) the log, cut a torn last line, start the writer thread."""
        with self._lock:
            self._open_file(repair=True)
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Write what is queued, seal with a checkpoint, stop the thread."""
        if self._thread is not None:
            self._queue.put(("stop", None))
            self._thread.join()
            self._thread = None
        with self._lock:
            self._seal()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # ---- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            timeout = None
            if self._first_unsealed is not None:
                timeout = max(0.0, self._first_unsealed + self.settings.checkpoint_interval_s - time.time())
            try:
                kind, item = self._queue.get(timeout=timeout)
            except queue.Empty:
                kind, item = "checkpoint", None
            try:
                with self._lock:
                    if kind == "record":
                        self._write_entry(item)
                    elif kind == "checkpoint":
                        self._seal()
                    elif kind == "flush":
                        item.set()
                    elif kind == "stop":
                        return
            except Exception:  # a bug must not stop auditing
                log.exception("audit: writing failed")

    def _open_file(self, repair: bool) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with _locked(self.directory):
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            self._head, cut = _read_head(fd, repair=repair)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        if cut:
            log.warning("audit: %s ended in a half-written record (%d bytes, a write cut short by a crash): cut off",
                        self.path, cut)
            self._write_entry(("local", "audit.repaired", LOG_NAME, "ok", {"bytes_cut": cut}, time.time()))

    def _write_entry(self, entry: tuple[str, str, str, str, dict[str, Any], float]) -> bool:
        """Write one record (after an ``audit.dropped`` one when records were lost); under `_lock`."""
        overflow, self._overflow = self._overflow, 0
        if overflow:  # already counted in dropped_queue
            self._note_loss(overflow, counted=True)
        if self._lost:
            note = ("local", "audit.dropped", LOG_NAME, "error",
                    {"count": self._lost, "since": round(self._lost_since or 0.0, 3), "reason": self._lost_reason},
                    time.time())
            if not self._write_one(note):
                self._note_loss(1)
                return False
            self._lost, self._lost_since = 0, None
        if not self._write_one(entry):
            self._note_loss(1)
            return False
        return True

    def _write_one(self, entry: tuple[str, str, str, str, dict[str, Any], float],
                   checkpoint: Ed25519PrivateKey | None = None) -> bool:
        """Append `entry` (signed with `checkpoint`, a key, for a checkpoint) under the file lock;
        False (and `error` set) when the disk refuses it."""
        action = entry[1]
        try:
            if self._fd is None:
                self._open_file(repair=True)
            with _locked(self.directory):
                record = self._append_locked(entry, checkpoint)
                rotated = None
                if action == CHECKPOINT and self._head.size > self.settings.max_bytes:
                    rotated = self._rotate_locked()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if self.error is None:
                log.error("audit: %s refuses records (%s): serving goes on; lost records are counted "
                          "(edgefleet_audit_dropped_total) and alerted (audit_dropping)", self.path, reason)
            self.error = self._lost_reason = reason
            return False
        if self.error is not None:
            log.warning("audit: %s takes records again", self.path)
            self.error = None
        for written in (record, rotated):
            if written is not None:
                self._written(written)
        if action != CHECKPOINT and (self._since_checkpoint >= self.settings.checkpoint_every
                                     or self._head.size > self.settings.max_bytes):
            self._seal()
        return True

    def _append_locked(self, entry: tuple[str, str, str, str, dict[str, Any], float],
                       checkpoint: Ed25519PrivateKey | None) -> dict[str, Any]:
        """`checkpoint`: the key that signs this record (a checkpoint), else None."""
        actor, action, target, outcome, detail, at = entry
        self._follow_file()
        assert self._fd is not None
        if checkpoint is not None:
            detail = checkpoint_detail(checkpoint, self.device, self._head.seq, self._head.hash, at)
        record = make_record(self._head.seq + 1, at, actor, action, target, outcome, detail, self._head.hash)
        self._head = _append(self._fd, self._head, record)
        return record

    def _written(self, record: dict[str, Any]) -> None:
        self.written += 1
        if record["action"] == CHECKPOINT:
            self._since_checkpoint, self._first_unsealed = 0, None
            with contextlib.suppress(OSError):
                write_file_atomic(self.directory / CHECKPOINT_NAME, line_of(record), mode=0o600)
        else:
            self._since_checkpoint += 1
            self._first_unsealed = self._first_unsealed or time.time()
        if self.on_line is not None:
            try:
                self.on_line(line_of(record))
            except Exception:  # forwarding is best effort; the file is the record
                log.exception("audit: forwarding a record failed")

    def _follow_file(self) -> None:
        """Under the lock: another process appended (or the file was rotated): read the head again."""
        assert self._fd is not None
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            inode = -1
        if inode != self._head.inode:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            os.close(self._fd)
            self._fd = fd
            previous = self._head
            self._head, _ = _read_head(fd, repair=True)
            if self._head.seq == 0:  # a new empty file: the chain goes on from where it was
                self._head.seq, self._head.hash = previous.seq, previous.hash
        elif os.fstat(self._fd).st_size != self._head.size:
            self._head, _ = _read_head(self._fd, repair=True)

    def _seal(self) -> None:
        """A signed checkpoint, if any record is not sealed yet."""
        if self._since_checkpoint == 0:
            return
        try:
            key = self.key.get() if isinstance(self.key, DeviceKey) else self.key
        except (OSError, ValueError) as exc:
            self._key_failed(f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.strerror
                             else str(exc))
            return
        if self.key_error is not None:
            log.warning("audit: the device key signs checkpoints again")
            self.key_error = None
        self._write_one(("local", CHECKPOINT, self.device, "ok", {}, time.time()), checkpoint=key)

    def _key_failed(self, reason: str) -> None:
        """The checkpoint due now cannot be signed: lost and counted like a refused record; the
        next try waits a whole checkpoint period (records go on being chained meanwhile)."""
        if reason != self.key_error:
            log.error("audit: a checkpoint cannot be signed: %s: records are still chained but not sealed; the lost "
                      "checkpoint is counted (edgefleet_audit_dropped_total) and alerted (audit_dropping); fix the "
                      "key file (edgefleet doctor checks it)", reason)
        self.key_error = reason
        self._lost_reason = f"the device key cannot sign: {reason}"
        self._note_loss(1)
        self._since_checkpoint, self._first_unsealed = 0, time.time()

    def _rotate_locked(self) -> dict[str, Any] | None:
        """Under the file lock: audit.log -> audit.log.1 -> … (the oldest past `keep_files`
        deleted); the new file starts with ``audit.rotated``, chained to the last head."""
        keep = self.settings.keep_files
        try:
            for n in range(keep, 0, -1):
                older = self.directory / f"{LOG_NAME}.{n}"
                if n == keep:
                    older.unlink(missing_ok=True)
                elif older.exists():
                    older.rename(self.directory / f"{LOG_NAME}.{n + 1}")
            if keep:
                self.path.rename(self.directory / f"{LOG_NAME}.1")
            else:
                self.path.unlink()
        except OSError as exc:
            log.error("audit: cannot rotate %s (%s): it grows on", self.path, exc.strerror)
            return None
        entry = ("local", ROTATED, LOG_NAME, "ok", {"from": f"{LOG_NAME}.1" if keep else None}, time.time())
        return self._append_locked(entry, checkpoint=None)

    def _note_loss(self, count: int, counted: bool = False) -> None:
        if not counted:
            self.dropped_disk += count
        if not self._lost:
            self._lost_since = time.time()
        self._lost += count
