"""A laptop or board running on its battery (`/sys/class/power_supply/*`, ACPI).

While the battery discharges, `power_now` (µW) — or `current_now` x `voltage_now` —
is what the whole machine draws. On external power it measures charging instead,
so the source then says it is unavailable and why.
"""

from __future__ import annotations

from pathlib import Path

from .sources import DomainReading, Method, SourceUnavailable, read_int, read_text

POWER_SUPPLY = Path("/sys/class/power_supply")


class BatterySource:
    name = "battery"
    method: Method = "measured"
    description = "whole machine, from the battery while it discharges (ACPI power_supply)"

    def __init__(self, root: Path = POWER_SUPPLY) -> None:
        self.root = root
        self._batteries = []
        for supply in sorted(root.iterdir()) if root.is_dir() else []:
            try:
                if read_text(supply / "type") == "Battery":
                    self._batteries.append(supply)
            except OSError:
                continue
        if not self._batteries:
            raise SourceUnavailable(f"no battery under {root}", "absent")

    def read(self) -> list[DomainReading]:
        readings = []
        for battery in self._batteries:
            try:
                status = read_text(battery / "status")
                if status != "Discharging":
                    raise SourceUnavailable(f"{battery.name} is {status.lower()}: on external power its "
                                            "power_now measures charging, not what the machine uses", "external_power")
                if (battery / "power_now").exists():
                    watts = read_int(battery / "power_now") / 1e6
                else:
                    watts = read_int(battery / "current_now") * read_int(battery / "voltage_now") / 1e12
            except OSError as exc:
                raise SourceUnavailable(f"{battery.name}: {exc.strerror or exc}") from None
            readings.append(DomainReading(battery.name, "power", abs(watts)))
        return readings

    def close(self) -> None:
        pass
