"""The ``[alerts]`` section of the agent's config: one table per rule, with safe defaults.

Lives beside the rule engine it configures; agent/config.py makes it the
``alerts`` field of `AgentConfig`. Every rule has the same keys: a `threshold`
the value must go *above* to fire, held for `for_s`; a `resolve` level it must
come back to (at or below) for `clear_for_s` before it resolves — two levels and
two durations, so a value hovering at the threshold fires once, not every
evaluation. Rules that count events or rates over time add `window_s`, and the
rate rules a `min_requests` below which there is no figure. Each rule's own class
carries its defaults, so ``[alerts.temperature] threshold = 90`` keeps the
temperature rule's other defaults. The section is read again at a reload (SIGHUP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

Severity = Literal["info", "warning", "critical"]


@dataclass(frozen=True)
class RuleSettings:
    #: false: never fires (one that fires now resolves at the next evaluation)
    enabled: bool = True
    severity: Severity = "warning"
    #: fires when the value is above this for `for_s`
    threshold: float = 0.0
    #: resolves when the value is at or below this for `clear_for_s` (default: the threshold)
    resolve: float | None = None
    for_s: float = 0.0
    clear_for_s: float = 0.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold):
            raise ValueError("threshold must be a finite number")
        if self.resolve is not None and not (math.isfinite(self.resolve) and self.resolve <= self.threshold):
            raise ValueError(f"resolve must be at most threshold ({self.threshold:g}), got {self.resolve:g} "
                             "(an alert resolves at or below it: set both)")
        for name in ("for_s", "clear_for_s"):
            if not 0 <= getattr(self, name) <= 86_400 * 7:
                raise ValueError(f"{name} must be 0..604800 seconds")

    @property
    def resolve_at(self) -> float:
        return self.threshold if self.resolve is None else self.resolve


@dataclass(frozen=True)
class WindowedRule(RuleSettings):
    """A rule on what happened within the last `window_s` (a count or a rate)."""

    window_s: float = 300.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.window_s <= 86_400 * 7:
            raise ValueError("window_s must be 1..604800 seconds")


@dataclass(frozen=True)
class RateRule(WindowedRule):
    """A rule on requests within the window: no figure (never fires) below `min_requests`."""

    min_requests: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_requests < 1:
            raise ValueError("min_requests must be at least 1")


@dataclass(frozen=True)
class TemperatureRule(RuleSettings):
    """The hottest temperature sensor, °C."""

    threshold: float = 85.0
    resolve: float | None = 80.0
    for_s: float = 60.0
    clear_for_s: float = 60.0


@dataclass(frozen=True)
class MemoryRule(RuleSettings):
    """The machine's memory in use (total less available), percent."""

    threshold: float = 90.0
    resolve: float | None = 85.0
    for_s: float = 60.0
    clear_for_s: float = 60.0


@dataclass(frozen=True)
class DiskRule(RuleSettings):
    """The state directory's filesystem, percent used."""

    threshold: float = 90.0
    resolve: float | None = 85.0
    for_s: float = 60.0
    clear_for_s: float = 60.0


@dataclass(frozen=True)
class ErrorRateRule(RateRule):
    """API requests answered 5xx within the window, percent of all API requests."""

    threshold: float = 5.0
    resolve: float | None = 2.0
    for_s: float = 60.0
    clear_for_s: float = 120.0


@dataclass(frozen=True)
class TtftRule(RateRule):
    """Time to first token, 95th percentile within the window, seconds (the worst model)."""

    threshold: float = 10.0
    resolve: float | None = 5.0
    for_s: float = 60.0
    clear_for_s: float = 120.0
    min_requests: int = 10


@dataclass(frozen=True)
class ModelFailedRule(RuleSettings):
    """Models whose load or probe failed (registry state ``failed``)."""

    severity: Severity = "critical"


@dataclass(frozen=True)
class UpdateRefusalsRule(WindowedRule):
    """Update jobs that ended rejected, failed or rolled back, and looks at the hub that
    ended refused, within the window."""

    threshold: float = 2.0
    resolve: float | None = 0.0
    window_s: float = 3600.0


@dataclass(frozen=True)
class EnergySourceLostRule(RuleSettings):
    """Energy sources in use that cannot be read now."""

    for_s: float = 30.0
    clear_for_s: float = 30.0


@dataclass(frozen=True)
class OutboxDropsRule(WindowedRule):
    """Records and messages dropped within the window: the outbox's bound, records neither
    stored nor sent, the broker's refusals, the MQTT send queue's bound."""

    window_s: float = 600.0


@dataclass(frozen=True)
class AuditDroppingRule(WindowedRule):
    """Audit records lost within the window: the disk refused them (full, read-only) or the
    writer fell behind (edgefleet_audit_dropped_total)."""

    window_s: float = 600.0


@dataclass(frozen=True)
class AlertSettings:
    """``[alerts]``: on by default (they need ``[telemetry] enabled``); docs/operations.md#alerts."""

    enabled: bool = True
    #: seconds between evaluations of every rule
    interval_s: float = 5.0
    temperature: TemperatureRule = field(default_factory=TemperatureRule)
    memory: MemoryRule = field(default_factory=MemoryRule)
    disk: DiskRule = field(default_factory=DiskRule)
    error_rate: ErrorRateRule = field(default_factory=ErrorRateRule)
    ttft_p95: TtftRule = field(default_factory=TtftRule)
    model_failed: ModelFailedRule = field(default_factory=ModelFailedRule)
    update_refusals: UpdateRefusalsRule = field(default_factory=UpdateRefusalsRule)
    energy_source_lost: EnergySourceLostRule = field(default_factory=EnergySourceLostRule)
    outbox_drops: OutboxDropsRule = field(default_factory=OutboxDropsRule)
    audit_dropping: AuditDroppingRule = field(default_factory=AuditDroppingRule)

    def __post_init__(self) -> None:
        if not 0.1 <= self.interval_s <= 3600:
            raise ValueError("interval_s must be 0.1..3600")

    def rules(self) -> dict[str, RuleSettings]:
        """Rule name -> its settings, in the documented order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("enabled", "interval_s")}


RULE_NAMES: tuple[str, ...] = tuple(AlertSettings().rules())
