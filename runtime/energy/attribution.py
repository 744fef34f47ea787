"""Which model used the energy: windows of measured joules split by busy time.

Each meter sample is a window: its joules (all in-total domains) and, per model,
the seconds it spent running requests in that window (the registry's busy time,
including the job still running). Within a window:

- **idle** joules are the idle baseline power x the window's length (capped at
  the window's joules). The baseline is the lowest power of the last
  `IDLE_WINDOWS` windows in which no model was busy (so a model loading, or another
  process's burst, does not raise it); until one is seen, the lowest window power so far;
- **active** joules are the rest. Only the share the agent's own CPU time explains
  (its process CPU seconds / the machine's busy CPU seconds in the window, from
  cpu_share.py) is the agent's: it goes to the models busy in the window in proportion
  to their busy seconds (**models**), or, when none was busy, stays the **agent**'s
  (loading, HTTP, telemetry). The rest is **other**: other processes' work (a package
  build beside the agent), billed to no model;
- total = active + idle and active = models + agent + other, always.

A model's `energy_j` is its share of active joules (idle excluded);
`energy_incl_idle_j` adds the idle baseline for the time it was busy (its share of
the window's idle joules), which is what the device drew while serving it.
Windows whose joules are unknown (a source unavailable, a counter reset) are not
attributed; their length is counted in `unattributed_s`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field, replace

from .cpu_share import CpuWindow

IDLE_WINDOWS = 120


@dataclass
class ModelEnergy:
    #: share of active joules (idle baseline excluded)
    energy_j: float = 0.0
    #: plus the idle baseline while it was busy
    energy_incl_idle_j: float = 0.0
    #: busy seconds inside attributed windows
    busy_s: float = 0.0


@dataclass(frozen=True)
class AttributionSnapshot:
    total_j: float
    active_j: float
    idle_j: float
    idle_power_w: float | None
    #: whether the idle baseline comes from truly idle windows (False: provisional, the lowest seen)
    idle_power_learnt: bool
    attributed_s: float
    unattributed_s: float
    models: dict[str, ModelEnergy]
    #: active joules billed to models (the sum of their `energy_j`)
    models_j: float = 0.0
    #: active joules of the agent's own CPU work while no model was busy
    agent_j: float = 0.0
    #: active joules other processes' CPU work explains: billed to no model
    other_j: float = 0.0
    #: the agent's process CPU seconds and the machine's busy CPU seconds in attributed windows
    agent_cpu_s: float = 0.0
    busy_cpu_s: float = 0.0


@dataclass
class Attribution:
    total_j: float = 0.0
    active_j: float = 0.0
    idle_j: float = 0.0
    attributed_s: float = 0.0
    unattributed_s: float = 0.0
    idle_power_w: float | None = None
    idle_power_learnt: bool = False
    models_j: float = 0.0
    agent_j: float = 0.0
    other_j: float = 0.0
    agent_cpu_s: float = 0.0
    busy_cpu_s: float = 0.0
    models: dict[str, ModelEnergy] = field(default_factory=dict)
    _busy_seen: dict[str, float] = field(default_factory=dict)
    _lowest_w: float | None = None
    _idle_powers: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=IDLE_WINDOWS))

    def window(self, seconds: float, joules: float | None, busy_now: dict[str, float],
               cpu: CpuWindow | None = None) -> None:
        """Account one window: `busy_now` is each model's cumulative busy seconds at its end,
        `cpu` the agent's and the machine's CPU seconds in it (None: unknown, all of the
        active joules are taken to be the agent's)."""
        busy: dict[str, float] = {}
        for name, value in busy_now.items():
            seen = self._busy_seen.get(name)
            if seen is None:  # first sight: what it did before the meter started is not ours
                self._busy_seen[name] = value
                continue
            if value > seen:
                busy[name] = value - seen
                self._busy_seen[name] = value
        if seconds <= 0:
            return
        if joules is None:
            self.unattributed_s += seconds
            return
        power = joules / seconds
        self._lowest_w = power if self._lowest_w is None else min(self._lowest_w, power)
        total_busy = sum(busy.values())
        if total_busy == 0:
            self._idle_powers.append(power)
            self.idle_power_w = min(self._idle_powers)
            self.idle_power_learnt = True
        baseline = self.idle_power_w if self.idle_power_learnt else self._lowest_w
        idle = min(joules, (baseline or 0.0) * seconds)
        active = joules - idle
        self.total_j += joules
        self.idle_j += idle
        self.active_j += active
        self.attributed_s += seconds
        ours = active * (cpu.agent_share if cpu is not None else 1.0)
        self.other_j += active - ours
        if cpu is not None:
            self.agent_cpu_s += cpu.process_s
            self.busy_cpu_s += cpu.busy_s
        if total_busy == 0:
            self.agent_j += ours
            return
        self.models_j += ours
        busy_span = max(total_busy, seconds)  # overlapping models share the window's idle joules
        for name, seconds_busy in busy.items():
            model = self.models.setdefault(name, ModelEnergy())
            share = ours * seconds_busy / total_busy
            model.energy_j += share
            model.energy_incl_idle_j += share + idle * seconds_busy / busy_span
            model.busy_s += seconds_busy

    def snapshot(self) -> AttributionSnapshot:
        return AttributionSnapshot(
            self.total_j, self.active_j, self.idle_j, self.idle_power_w if self.idle_power_learnt else self._lowest_w,
            self.idle_power_learnt, self.attributed_s, self.unattributed_s,
            {name: replace(m) for name, m in self.models.items()},
            self.models_j, self.agent_j, self.other_j, self.agent_cpu_s, self.busy_cpu_s)
