"""The telemetry outbox: records waiting for the broker, on disk, in order, bounded.

SQLite (standard library) does the durable part: an append is one transaction,
so a record is either wholly there or not after a crash or power cut, and the
order is the sequence number, which also numbers records across agent restarts
(the last one used is kept even when the outbox is empty). Past `max_records`,
the *oldest* records fall off — telemetry carries cumulative counters, so the
newest record still holds every joule — and each one that falls is counted in
`dropped`, kept on disk and reported in the next records.

Every call is blocking file I/O: the publisher runs them on the outbox's own
single worker thread, which also serializes them. A call the disk refuses (full,
read-only, I/O error) raises `OutboxStorageError` with SQLite's reason; the
database is opened on first use and again after such a failure, so an outbox
that could not even be created at start-up works once there is room. Records
the publisher could neither store nor send are added to `lost` once storing
works again, so the count survives restarts like `dropped`.

Beside the records, the outbox keeps *messages*: payloads with a topic and a
retain flag of their own (alerts, agent/fleet/alerts.py), which must survive a
broker outage too and must not take telemetry sequence numbers (a gap in `seq`
means a lost record). They have their own table, their own order and their own
bound (`max_messages`, oldest dropped past it and counted in `messages_dropped`).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import SyncError

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
                                     payload BLOB NOT NULL, retain INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class OutboxStats:
    queued: int
    #: records that fell off the bound since the outbox was created (survives restarts)
    dropped: int
    #: records the broker refused (PUBACK failure), dropped and counted
    refused: int
    last_seq: int
    #: records that could be neither stored nor sent (a full disk with the broker away), ever
    lost: int = 0
    #: messages (alerts) waiting for the broker, and those that fell off their bound (ever)
    messages_queued: int = 0
    messages_dropped: int = 0


@dataclass(frozen=True)
class OutboxMessage:
    """A payload for a topic of its own (an alert), waiting for the broker."""

    id: int
    topic: str
    payload: bytes
    retain: bool


class OutboxStorageError(SyncError):
    """The outbox cannot be read or written (disk full, read-only, I/O error); says why."""


class Outbox:
    def __init__(self, directory: Path, max_records: int = 10_000, max_messages: int = 1000) -> None:
        if max_records < 1 or max_messages < 1:
            raise ValueError("max_records and max_messages must be at least 1")
        self.directory = directory
        self.path = directory / "telemetry.sqlite3"
        self.max_records = max_records
        self.max_messages = max_messages
        self._conn: sqlite3.Connection | None = None

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, never corrupt
                db.executescript(SCHEMA)
            except BaseException:
                db.close()
                raise
            self._conn = db
        return self._conn

    @contextlib.contextmanager
    def _storage(self) -> Iterator[None]:
        """Map the disk's refusals to one error that names the file and SQLite's reason."""
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
                self.close()  # reopened at the next call
            raise OutboxStorageError(f"{self.path}: {reason}") from exc

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = ?",
                         (key, value, value))

    def next_seq(self) -> int:
        """The sequence number the next record will get (1 for a new outbox)."""
        with self._storage():
            return self._meta("last_seq") + 1

    def append(self, seq: int, payload: bytes) -> int:
        """Store a record under `seq` (from `next_seq`), dropping the oldest past the bound;
        returns how many fell off now."""
        with self._storage(), self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT INTO records(seq, payload) VALUES(?, ?)", (seq, payload))
            self._set_meta("last_seq", seq)
            (count,) = self._db.execute("SELECT COUNT(*) FROM records").fetchone()
            excess = count - self.max_records
            if excess > 0:
                self._db.execute("DELETE FROM records WHERE seq IN (SELECT seq FROM records ORDER BY seq LIMIT ?)",
                                 (excess,))
                self._set_meta("dropped", self._meta("dropped") + excess)
            return max(0, excess)

    def peek(self, limit: int, after: int = 0) -> list[tuple[int, bytes]]:
        """The oldest `limit` records with a seq above `after`, in order."""
        with self._storage():
            return [(int(seq), bytes(payload)) for seq, payload in self._db.execute(
                "SELECT seq, payload FROM records WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))]

    def remove_through(self, seq: int) -> None:
        """Forget every record up to and including `seq` (the broker has them)."""
        with self._storage():
            self._db.execute("DELETE FROM records WHERE seq <= ?", (seq,))

    def refuse(self, seq: int) -> None:
        """Drop one record the broker refused, and count it."""
        with self._storage(), self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM records WHERE seq = ?", (seq,))
            self._set_meta("refused", self._meta("refused") + 1)

    def add_lost(self, count: int) -> None:
        """Count records that could be neither stored nor sent (kept on disk like `dropped`)."""
        with self._storage(), self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._set_meta("lost", self._meta("lost") + count)

    def append_message(self, topic: str, payload: bytes, retain: bool) -> int:
        """Store a message for `topic`, after every message stored before it, dropping the oldest
        past `max_messages`; returns how many fell off now."""
        with self._storage(), self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT INTO messages(topic, payload, retain) VALUES(?, ?, ?)",
                             (topic, payload, int(retain)))
            (count,) = self._db.execute("SELECT COUNT(*) FROM messages").fetchone()
            excess = count - self.max_messages
            if excess > 0:
                self._db.execute("DELETE FROM messages WHERE id IN (SELECT id FROM messages ORDER BY id LIMIT ?)",
                                 (excess,))
                self._set_meta("messages_dropped", self._meta("messages_dropped") + excess)
            return max(0, excess)

    def peek_messages(self, limit: int, after: int = 0) -> list[OutboxMessage]:
        """The oldest `limit` messages with an id above `after`, in order."""
        with self._storage():
            return [OutboxMessage(int(id_), str(topic), bytes(payload), bool(retain))
                    for id_, topic, payload, retain in self._db.execute(
                        "SELECT id, topic, payload, retain FROM messages WHERE id > ? ORDER BY id LIMIT ?",
                        (after, limit))]

    def remove_messages_through(self, id_: int) -> None:
        """Forget every message up to and including `id_` (the broker has them, or refused them)."""
        with self._storage():
            self._db.execute("DELETE FROM messages WHERE id <= ?", (id_,))

    def stats(self) -> OutboxStats:
        with self._storage():
            (count,) = self._db.execute("SELECT COUNT(*) FROM records").fetchone()
            (messages,) = self._db.execute("SELECT COUNT(*) FROM messages").fetchone()
            return OutboxStats(int(count), self._meta("dropped"), self._meta("refused"), self._meta("last_seq"),
                               self._meta("lost"), int(messages), self._meta("messages_dropped"))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
