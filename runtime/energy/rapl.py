"""Linux powercap RAPL (`/sys/class/powercap/intel-rapl:*`): CPU package and DRAM energy.

Counters in microjoules that wrap at `max_energy_range_uj`. Since Linux 5.10
(CVE-2020-8694, "Platypus") `energy_uj` is readable by root only; we say so
rather than report nothing. The core / uncore sub-domains are inside the package
and are left out so nothing is counted twice; AMD CPUs appear under the same names.
"""

from __future__ import annotations

from pathlib import Path

from .sources import DomainReading, Method, SourceUnavailable, read_int, read_text

POWERCAP = Path("/sys/class/powercap")
_KEPT = ("package", "dram")


class RaplSource:
    name = "rapl"
    method: Method = "measured"
    description = "CPU package and DRAM (powercap RAPL)"

    def __init__(self, root: Path = POWERCAP) -> None:
        self.root = root
        zones = sorted(p for p in root.glob("intel-rapl:*") if (p / "energy_uj").exists()) if root.is_dir() else []
        self._zones: list[tuple[str, Path]] = []
        for zone in zones:
            try:
                label = read_text(zone / "name")
            except OSError:
                continue
            if not label.startswith(_KEPT):
                continue
            package = zone.name.split(":")[1]
            domain = label if label.startswith("package") else f"{label}-{package}"
            self._zones.append((domain, zone))
        if not self._zones:
            raise SourceUnavailable(f"no RAPL package or DRAM domains under {root}", "absent")

    def read(self) -> list[DomainReading]:
        readings = []
        for domain, zone in self._zones:
            try:
                energy_uj = read_int(zone / "energy_uj")
            except PermissionError:
                raise SourceUnavailable(
                    f"{zone / 'energy_uj'}: permission denied — readable by root only since Linux 5.10 "
                    "(CVE-2020-8694); run the agent as root or let its group read it (udev rule)",
                    "permission_denied") from None
            except OSError as exc:
                raise SourceUnavailable(f"{zone / 'energy_uj'}: {exc.strerror}") from None
            try:
                max_range: float | None = read_int(zone / "max_energy_range_uj") / 1e6
            except (OSError, SourceUnavailable):
                max_range = None
            readings.append(DomainReading(domain, "energy", energy_uj / 1e6, max_range))
        return readings

    def close(self) -> None:
        pass
