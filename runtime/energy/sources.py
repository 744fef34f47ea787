"""What an energy source is: something that reads domains, or says why it cannot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

Method = Literal["measured", "estimated"]


#: Why a source cannot be read, as a bounded code (/metrics' `reason` label; the message has
#: the detail): no such hardware or driver, not allowed, a battery on external power, a
#: read that failed.
UnavailableCode = Literal["absent", "permission_denied", "external_power", "unreadable"]


class SourceUnavailable(Exception):
    """This source cannot be read here; the message says why (shown, never hidden as 0 W)."""

    def __init__(self, message: str, code: UnavailableCode = "unreadable") -> None:
        super().__init__(message)
        self.code: UnavailableCode = code


@dataclass(frozen=True)
class DomainReading:
    """One reading of one domain: a cumulative energy counter (joules) or a power sample (watts)."""

    #: e.g. "package-0", "dram-0", "gpu-0", "VDD_IN", "BAT0", "cpu"
    domain: str
    kind: Literal["energy", "power"]
    value: float
    #: for counters: the value at which it wraps to 0, in joules; None when unknown
    max_range_j: float | None = None
    #: whether this domain adds to the device total (False for rails inside another rail)
    in_total: bool = True


class EnergySource(Protocol):
    #: "rapl", "nvml", "hwmon", "ina3221", "battery", "estimate"
    name: str
    method: Method
    #: what the source covers, in words, for the payload's `covers`
    description: str

    def read(self) -> list[DomainReading]:
        """All domains now; raises SourceUnavailable with the reason."""
        ...

    def close(self) -> None: ...


def read_text(path: Path) -> str:
    """A sysfs attribute, stripped; PermissionError and OSError pass through."""
    return path.read_text(encoding="ascii", errors="replace").strip()


def read_int(path: Path) -> int:
    text = read_text(path)
    try:
        return int(text)
    except ValueError:
        raise SourceUnavailable(f"{path}: not a number: {text!r}") from None
