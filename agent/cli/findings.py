"""What one `edgefleet doctor` check found: a level, what it saw, and what to do about it.

Its own module so that the checks can live in several modules (agent/cli/doctor.py for the
machine and the files, agent/cli/doctor_network.py for ports, broker and hub) without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Level(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Finding:
    level: Level
    check: str
    detail: str
    #: what to do (printed as ``fix:`` under a warning or a failure)
    fix: str = ""
