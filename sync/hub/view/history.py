"""The device charts' history: a small SQLite file on the hub side, bounded.

Points (device, series, t, value) come from telemetry records; update job
transitions are kept as events. Bounded three ways, pruned on a timer
(`History.prune`): at most `max_points` per device and series, nothing older than
`max_age_s`, and at most `max_rows` in all (the oldest go first), so a flood of
made-up device ids cannot grow the file without end. WAL journal: a reader never
waits for the writer. Every call is blocking: the server runs them in its own
single worker thread (one connection, one thread), never on the event loop.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

SCHEMA = """
CREATE TABLE IF NOT EXISTS points (device TEXT NOT NULL, series TEXT NOT NULL, t REAL NOT NULL, value REAL NOT NULL);
CREATE INDEX IF NOT EXISTS points_by_series ON points (device, series, t);
CREATE INDEX IF NOT EXISTS points_by_time ON points (t);
CREATE TABLE IF NOT EXISTS events (device TEXT NOT NULL, t REAL NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_device ON events (device, t);
"""


@dataclass(frozen=True)
class Limits:
    max_points: int = 2000
    max_events: int = 200
    max_age_s: float = 7 * 86400.0
    max_rows: int = 2_000_000


class History:
    def __init__(self, path: Path | str | None, limits: Limits | None = None) -> None:
        """`path` None: in memory (the history lasts as long as the process)."""
        self.limits = limits or Limits()
        self.db = sqlite3.connect(":memory:" if path is None else str(path), check_same_thread=False)
        if path is not None:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def add(self, points: list[tuple[str, str, float, float]], events: list[tuple[str, float, dict[str, Any]]]) -> None:
        with self.db:
            self.db.executemany("INSERT INTO points VALUES (?, ?, ?, ?)", points)
            self.db.executemany("INSERT INTO events VALUES (?, ?, ?)",
                                [(d, t, orjson.dumps(body)) for d, t, body in events])

    def series(self, device: str, since: float | None = None) -> dict[str, list[tuple[float, float]]]:
        """series name -> [(t, value)], oldest first."""
        rows = self.db.execute("SELECT series, t, value FROM points WHERE device = ? AND t >= ? ORDER BY t",
                               (device, since or 0.0)).fetchall()
        out: dict[str, list[tuple[float, float]]] = {}
        for series, t, value in rows:
            out.setdefault(series, []).append((t, value))
        return out

    def events(self, device: str, limit: int = 50) -> list[dict[str, Any]]:
        """The device's latest events (update job transitions), newest first."""
        rows = self.db.execute("SELECT t, body FROM events WHERE device = ? ORDER BY t DESC LIMIT ?",
                               (device, limit)).fetchall()
        return [orjson.loads(body) | {"received_at": t} for t, body in rows]

    def prune(self, now: float | None = None) -> int:
        """Apply the bounds; returns how many rows went."""
        now = time.time() if now is None else now
        limits = self.limits
        before = self.db.total_changes
        with self.db:
            self.db.execute("DELETE FROM points WHERE t < ?", (now - limits.max_age_s,))
            self.db.execute("DELETE FROM events WHERE t < ?", (now - limits.max_age_s,))
            for device, series in self.db.execute(
                    "SELECT device, series FROM points GROUP BY device, series HAVING COUNT(*) > ?",
                    (limits.max_points,)).fetchall():
                self.db.execute("DELETE FROM points WHERE rowid IN (SELECT rowid FROM points WHERE device = ? AND "
                                "series = ? ORDER BY t DESC LIMIT -1 OFFSET ?)", (device, series, limits.max_points))
            for (device,) in self.db.execute("SELECT device FROM events GROUP BY device HAVING COUNT(*) > ?",
                                             (limits.max_events,)).fetchall():
                self.db.execute("DELETE FROM events WHERE rowid IN (SELECT rowid FROM events WHERE device = ? "
                                "ORDER BY t DESC LIMIT -1 OFFSET ?)", (device, limits.max_events))
            (total,) = self.db.execute("SELECT COUNT(*) FROM points").fetchone()
            if total > limits.max_rows:
                self.db.execute("DELETE FROM points WHERE rowid IN (SELECT rowid FROM points ORDER BY t LIMIT ?)",
                                (total - limits.max_rows,))
        return self.db.total_changes - before

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM points").fetchone()[0])

    def close(self) -> None:
        self.db.close()
