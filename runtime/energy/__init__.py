"""Energy: where the joules come from (sources), how counters become joules (tracks),
and which model used them (attribution).

Sources read the operating system's own interfaces — powercap RAPL, NVML, hwmon,
power_supply — or, where none exists, estimate from CPU utilisation with a named
power model. Every reading says its source and whether it is measured or
estimated; a failed read is *unavailable, with the reason*, never 0 W.
"""

from .attribution import Attribution, AttributionSnapshot, ModelEnergy
from .meter import DomainState, EnergyMeter, EnergySnapshot, SourceState
from .sources import DomainReading, EnergySource, SourceUnavailable

__all__ = [
    "Attribution",
    "AttributionSnapshot",
    "DomainReading",
    "DomainState",
    "EnergyMeter",
    "EnergySnapshot",
    "EnergySource",
    "ModelEnergy",
    "SourceState",
    "SourceUnavailable",
]
