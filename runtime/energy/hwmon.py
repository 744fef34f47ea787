"""hwmon sensors (`/sys/class/hwmon/hwmon*`): power and energy inputs, and INA3221 rails.

- `energy*_input` (µJ counters, no documented range: a decrease is a reset) and
  `power*_input` / `power*_average` (µW samples), e.g. ina2xx, amd_energy, amdgpu;
- INA3221-style rail monitors (Jetson, many ARM boards): per channel `in*_input`
  (mV) x `curr*_input` (mA), named by `in*_label`. A rail called ``VDD_IN`` (Jetson's
  board input) contains the others, so only it counts toward the total.
"""

from __future__ import annotations

import re
from pathlib import Path

from .sources import DomainReading, Method, SourceUnavailable, read_int, read_text

HWMON = Path("/sys/class/hwmon")
BOARD_INPUT_RAILS = ("VDD_IN", "VIN_SYS_5V0", "POM_5V_IN")
_CHANNEL = re.compile(r"^(power|energy)(\d+)_(input|average)$")


class HwmonSource:
    name = "hwmon"
    method: Method = "measured"
    description = "hwmon power / energy sensors and INA3221 rails"

    def __init__(self, root: Path = HWMON) -> None:
        self.root = root
        #: (domain, kind, path(s), in_total)
        self._sensors: list[tuple[str, str, tuple[Path, ...], bool]] = []
        chips = sorted(root.glob("hwmon*")) if root.is_dir() else []
        for chip in chips:
            try:
                chip_name = read_text(chip / "name")
            except OSError:
                continue
            if chip_name.startswith("ina3221"):
                self._add_rails(chip, chip_name)
            else:
                self._add_power_energy(chip, chip_name)
        if not self._sensors:
            raise SourceUnavailable(f"no hwmon power, energy or rail sensors under {root}", "absent")
        if any(d in BOARD_INPUT_RAILS for d, *_ in self._sensors):
            self._sensors = [(d, k, p, d in BOARD_INPUT_RAILS) for d, k, p, _ in self._sensors]
            self.description = "board input rail (INA3221)"

    def _add_power_energy(self, chip: Path, chip_name: str) -> None:
        seen: set[tuple[str, str]] = set()
        for path in sorted(chip.iterdir()):
            m = _CHANNEL.match(path.name)
            if not m or (m[1], m[2]) in seen:
                continue
            if m[1] == "energy" and m[3] != "input":
                continue
            seen.add((m[1], m[2]))
            label_file = chip / f"{m[1]}{m[2]}_label"
            label = read_text(label_file) if label_file.exists() else f"{m[1]}{m[2]}"
            self._sensors.append((f"{chip_name}/{label}", m[1], (path,), True))

    def _add_rails(self, chip: Path, chip_name: str) -> None:
        for volts in sorted(chip.glob("in*_input")):
            channel = volts.name[2:].split("_")[0]
            current = chip / f"curr{channel}_input"
            if not current.exists():
                continue
            label_file = chip / f"in{channel}_label"
            label = read_text(label_file) if label_file.exists() else f"{chip_name}-{channel}"
            self._sensors.append((label, "rail", (volts, current), True))

    def read(self) -> list[DomainReading]:
        readings = []
        for domain, kind, paths, in_total in self._sensors:
            try:
                if kind == "energy":
                    readings.append(DomainReading(domain, "energy", read_int(paths[0]) / 1e6, None, in_total))
                elif kind == "power":
                    readings.append(DomainReading(domain, "power", read_int(paths[0]) / 1e6, None, in_total))
                else:
                    millivolts, milliamps = read_int(paths[0]), read_int(paths[1])
                    readings.append(DomainReading(domain, "power", millivolts * milliamps / 1e6, None, in_total))
            except PermissionError:
                raise SourceUnavailable(f"{paths[0]}: permission denied", "permission_denied") from None
            except OSError as exc:
                raise SourceUnavailable(f"{paths[0]}: {exc.strerror}") from None
        return readings

    def close(self) -> None:
        pass
