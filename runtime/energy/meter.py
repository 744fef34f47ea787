"""The energy meter: picks the best sources this machine has, samples them, and turns
counters and power samples into cumulative joules per domain.

Counter rules (what Scaphandre and CodeCarbon users trip over):

- the first reading of a counter is a baseline, not energy;
- a counter that goes down wrapped when its range is known (RAPL's
  `max_energy_range_uj`): the delta is taken modulo the range;
- a counter that goes down with no known range was reset (driver reload): that
  sample is dropped (counted in `resets`) and the new value is the baseline;
- a delta that would mean more than `max_plausible_w` is a reset or garbage:
  dropped and counted, never added;
- power samples (W) are integrated with the trapezoid rule; a negative or
  implausible sample is dropped and counted;
- a source that cannot be read is `unavailable` with its reason, and its domains
  have no power figure (None), never 0 W.

Which sources: for the host, the first that works of RAPL, hwmon/INA3221, battery;
NVIDIA GPUs (NVML) add to it; with no host source, the CPU estimate stands in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from .sources import DomainReading, EnergySource, SourceUnavailable

log = logging.getLogger(__name__)

#: Above this a delta is not energy but a reset or garbage (per domain).
MAX_PLAUSIBLE_W = 10_000.0


@dataclass
class DomainState:
    source: str
    domain: str
    method: str
    in_total: bool
    #: joules since the meter started (never decreases)
    energy_j: float = 0.0
    #: average power over the last sample interval; None when unknown or unavailable
    power_w: float | None = None
    wraps: int = 0
    resets: int = 0
    dropped_samples: int = 0
    _last: float | None = field(default=None, repr=False)
    _last_t: float = field(default=0.0, repr=False)

    def update(self, reading: DomainReading, t: float, max_w: float) -> float | None:
        """Add one reading; return the joules it adds (0 for a baseline), or None when dropped."""
        last, dt = self._last, t - self._last_t
        self._last, self._last_t = reading.value, t
        if reading.kind == "power":
            if not 0 <= reading.value <= max_w:
                self.dropped_samples += 1
                self._last = None
                self.power_w = None
                return None
            self.power_w = reading.value
            if last is None or dt <= 0:
                return 0.0
            delta = (last + reading.value) / 2 * dt
            self.energy_j += delta
            return delta
        if last is None:
            return 0.0
        delta = reading.value - last
        wrapped = False
        if delta < 0:
            if reading.max_range_j is None:
                self.resets += 1  # unknown range: cannot tell a wrap from a reset; drop it
                self.dropped_samples += 1
                self.power_w = None
                return None
            delta += reading.max_range_j
            wrapped = True
        if dt > 0 and delta > max_w * dt:
            if wrapped:
                self.resets += 1  # "wrapped" past plausibility: it was reset, not wrapped
            self.dropped_samples += 1
            self.power_w = None
            return None
        self.wraps += wrapped
        self.energy_j += delta
        self.power_w = delta / dt if dt > 0 else None
        return delta


@dataclass
class SourceState:
    name: str
    method: str
    description: str
    #: whether the meter uses this source (a working host source shadows the later ones)
    used: bool
    available: bool
    reason: str | None = None
    #: the reason as a bounded code (`UnavailableCode`, or "error" for an unexpected
    #: exception); "ok" while available
    code: str = "ok"


@dataclass(frozen=True)
class EnergySnapshot:
    """The meter's figures at one instant (copies, safe to hand to another thread)."""

    at: float
    #: joules since the meter started, over the domains that count toward the total
    total_j: float
    #: sum of the in-total domains' power; None when any of them has no figure
    power_w: float | None
    #: "measured", "estimated" or "mixed" (a measured GPU plus an estimated CPU), "unavailable"
    method: str
    domains: tuple[DomainState, ...]
    sources: tuple[SourceState, ...]
    estimate_model: str | None = None


@dataclass(frozen=True)
class Window:
    """What one `EnergyMeter.sample` adds: seconds and joules of the in-total domains."""

    seconds: float
    #: None when a domain could not be read or a sample was dropped: the window is not attributed
    joules: float | None


Factory = Callable[[], EnergySource]


class EnergyMeter:
    def __init__(self, host: list[Factory], accelerators: list[Factory], fallback: Factory | None,
                 max_plausible_w: float = MAX_PLAUSIBLE_W, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_plausible_w = max_plausible_w
        self._clock = clock
        self._sources: list[EnergySource] = []
        self._states: list[SourceState] = []
        self._domains: dict[tuple[str, str], DomainState] = {}
        self._last_t: float | None = None
        have_host = False
        for factory in host:
            source = self._try(factory, used=not have_host)
            have_host = have_host or source is not None
        for factory in accelerators:
            self._try(factory, used=True)
        if not have_host and fallback is not None:
            self._try(fallback, used=True)

    def _try(self, factory: Factory, used: bool) -> EnergySource | None:
        name = getattr(factory, "name", getattr(factory, "__name__", "source"))
        try:
            source = factory()
            source.read()  # a source that cannot be read now is not chosen
        except SourceUnavailable as exc:
            self._states.append(SourceState(name, "measured", "", used=False, available=False, reason=str(exc),
                                            code=exc.code))
            log.info("energy: %s unavailable: %s", name, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - a sensor driver's oddity must not stop the agent
            self._states.append(SourceState(name, "measured", "", used=False, available=False,
                                            reason=f"{type(exc).__name__}: {exc}", code="error"))
            log.warning("energy: %s failed: %s", name, exc)
            return None
        self._states.append(SourceState(source.name, source.method, source.description, used=used, available=True))
        if used:
            self._sources.append(source)
            log.info("energy: using %s (%s, %s)", source.name, source.method, source.description)
        else:
            source.close()
        return source

    @property
    def sources(self) -> list[SourceState]:
        return list(self._states)

    def sample(self) -> Window:
        """Read every used source once (blocking: sysfs, NVML; call it off the event loop)."""
        t = self._clock()
        joules: float | None = 0.0
        for source, state in zip(self._sources, [s for s in self._states if s.used], strict=True):
            try:
                readings = source.read()
            except SourceUnavailable as exc:
                if state.available:
                    log.warning("energy: %s became unavailable: %s", source.name, exc)
                state.available, state.reason, state.code = False, str(exc), exc.code
                for (src, _), domain in self._domains.items():
                    if src == source.name:
                        domain.power_w = None  # no figure, not 0 W; a counter's next delta covers the gap
                joules = None
                continue
            except Exception as exc:  # noqa: BLE001 - reported as unavailable, never raised into the loop
                state.available, state.reason, state.code = False, f"{type(exc).__name__}: {exc}", "error"
                joules = None
                continue
            state.available, state.reason, state.code = True, None, "ok"
            for reading in readings:
                key = (source.name, reading.domain)
                track = self._domains.get(key)
                if track is None:
                    track = self._domains[key] = DomainState(source.name, reading.domain, source.method,
                                                             reading.in_total)
                added = track.update(reading, t, self.max_plausible_w)
                if reading.in_total:
                    joules = None if added is None or joules is None else joules + added
        seconds = 0.0 if self._last_t is None else t - self._last_t
        first = self._last_t is None
        self._last_t = t
        return Window(seconds, None if first else joules)

    def snapshot(self) -> EnergySnapshot:
        domains = tuple(replace(d) for d in self._domains.values())
        counted = [d for d in domains if d.in_total]
        used = [s for s in self._states if s.used]
        methods = {s.method for s in used}
        method = "unavailable" if not used else "mixed" if len(methods) > 1 else methods.pop()
        power = None if not counted or any(d.power_w is None for d in counted) else sum(
            d.power_w for d in counted if d.power_w is not None)
        estimate = next((getattr(s, "model", None) for s in self._sources if s.method == "estimated"), None)
        return EnergySnapshot(time.time(), sum(d.energy_j for d in counted), power, method, domains,
                              tuple(replace(s) for s in self._states), estimate)

    def close(self) -> None:
        for source in self._sources:
            source.close()


def default_meter(estimate: dict[str, Any] | None = None, max_plausible_w: float = MAX_PLAUSIBLE_W) -> EnergyMeter:
    """The meter for this machine: RAPL, hwmon, battery for the host; NVML; else the CPU estimate."""
    from .battery import BatterySource
    from .estimate import CpuEstimateSource
    from .hwmon import HwmonSource
    from .nvml import NvmlSource
    from .rapl import RaplSource

    def named(name: str, factory: Factory) -> Factory:
        factory.name = name  # type: ignore[attr-defined]
        return factory

    return EnergyMeter(
        host=[named("rapl", RaplSource), named("hwmon", HwmonSource), named("battery", BatterySource)],
        accelerators=[named("nvml", NvmlSource)],
        fallback=named("estimate", lambda: CpuEstimateSource(**(estimate or {}))),
        max_plausible_w=max_plausible_w,
    )
