"""The webhook queue on disk: ``<hub>/webhooks.db`` (SQLite, WAL).

One row per (endpoint, event), in arrival order, deleted when delivered or given up, so
what was queued survives a restart of the process or the machine. Each endpoint's rows are
bounded by its `max_queue`: past it the *oldest* are dropped and counted (``dropped``; a
receiver that was away for days wants the news, and the `id`s it misses are gone for good
either way). Beside the queue, each source topic's memory (events.py) is written in the
same transaction as the events it produced, so a crash never loses an event and never
posts one twice because of a retained message read again.

Every method is blocking file I/O: the service runs them all on one worker thread, which
also serializes them.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .events import Event

DB_FILE = "webhooks.db"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS memory (topic TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS queue (seq INTEGER PRIMARY KEY AUTOINCREMENT, endpoint TEXT NOT NULL,
                                  event_id TEXT NOT NULL, kind TEXT NOT NULL, body BLOB NOT NULL,
                                  attempts INTEGER NOT NULL DEFAULT 0, queued_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS queue_endpoint ON queue (endpoint, seq);
CREATE TABLE IF NOT EXISTS counters (endpoint TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
                                     PRIMARY KEY (endpoint, name));
"""
#: what `counters` counts per endpoint (docs/operations.md, "Webhooks")
COUNTERS = ("delivered", "given_up", "dropped", "retries")


@dataclass(frozen=True)
class Queued:
    seq: int
    event_id: str
    kind: str
    body: bytes
    attempts: int


class WebhookStore:
    def __init__(self, hub_dir: Path) -> None:
        self.path = Path(hub_dir) / DB_FILE
        self._db: sqlite3.Connection | None = None
        #: True when this open created the database: retained messages are the baseline
        self.first_run = False

    def open(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # an event acknowledged to the broker is on disk
        db.executescript(SCHEMA)
        with _transaction(db):
            if db.execute("SELECT 1 FROM meta WHERE key = 'created'").fetchone() is None:
                db.execute("INSERT INTO meta VALUES ('created', ?)", (str(time.time()),))
                self.first_run = True
        self._db = db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self.open()
        assert self._db is not None
        return self._db

    def memory(self, topic: str) -> str | None:
        row = self.db.execute("SELECT value FROM memory WHERE topic = ?", (topic,)).fetchone()
        return row[0] if row else None

    def record(self, topic: str, remember: str | None, queued: Iterable[tuple[str, int, Event]]) -> dict[str, int]:
        """In one transaction: the topic's new memory, and each (endpoint, max_queue, event);
        returns endpoint -> events dropped to keep its bound."""
        dropped: dict[str, int] = {}
        db = self.db
        with _transaction(db):
            if remember is not None:
                db.execute("INSERT INTO memory VALUES (?, ?) ON CONFLICT (topic) DO UPDATE SET value = excluded.value",
                           (topic, remember))
            now = time.time()
            bounds: dict[str, int] = {}
            for endpoint, max_queue, event in queued:
                db.execute("INSERT INTO queue (endpoint, event_id, kind, body, queued_at) VALUES (?, ?, ?, ?, ?)",
                           (endpoint, event.id, event.kind, event.body, now))
                bounds[endpoint] = max_queue
            for endpoint, max_queue in bounds.items():
                (count,) = db.execute("SELECT COUNT(*) FROM queue WHERE endpoint = ?", (endpoint,)).fetchone()
                if count > max_queue:
                    db.execute("DELETE FROM queue WHERE seq IN (SELECT seq FROM queue WHERE endpoint = ? "
                               "ORDER BY seq LIMIT ?)", (endpoint, count - max_queue))
                    self._count(endpoint, "dropped", count - max_queue)
                    dropped[endpoint] = count - max_queue
        return dropped

    def head(self, endpoint: str) -> Queued | None:
        """The oldest event still to post to `endpoint`."""
        row = self.db.execute("SELECT seq, event_id, kind, body, attempts FROM queue WHERE endpoint = ? "
                              "ORDER BY seq LIMIT 1", (endpoint,)).fetchone()
        return Queued(row[0], row[1], row[2], bytes(row[3]), row[4]) if row else None

    def finish(self, endpoint: str, seq: int, outcome: str) -> None:
        """The event left the queue: `outcome` is "delivered" or "given_up"."""
        with _transaction(self.db):
            self.db.execute("DELETE FROM queue WHERE seq = ?", (seq,))
            self._count(endpoint, outcome, 1)

    def failed_attempt(self, endpoint: str, seq: int) -> None:
        with _transaction(self.db):
            self.db.execute("UPDATE queue SET attempts = attempts + 1 WHERE seq = ?", (seq,))
            self._count(endpoint, "retries", 1)

    def stats(self, endpoints: Iterable[str]) -> dict[str, dict[str, int]]:
        """endpoint -> queued and every counter (since the database was created)."""
        out = {e: {"queued": 0} | dict.fromkeys(COUNTERS, 0) for e in endpoints}
        for endpoint, count in self.db.execute("SELECT endpoint, COUNT(*) FROM queue GROUP BY endpoint"):
            if endpoint in out:
                out[endpoint]["queued"] = count
        for endpoint, name, value in self.db.execute("SELECT endpoint, name, value FROM counters"):
            if endpoint in out:
                out[endpoint][name] = value
        return out

    def _count(self, endpoint: str, name: str, n: int) -> None:
        self.db.execute("INSERT INTO counters VALUES (?, ?, ?) ON CONFLICT (endpoint, name) "
                        "DO UPDATE SET value = value + excluded.value", (endpoint, name, n))


class _transaction:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on an exception) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
