"""The alert rule engine: values in, firing and resolved transitions out. No I/O, no clock.

Each rule is a small state machine, as Prometheus's alerting rules are
(inactive -> pending -> firing), with one addition against flapping: a firing
alert resolves only once the value has stayed at or below the rule's *resolve*
level (below the threshold) for ``clear_for_s``. A value hovering at the
threshold therefore fires once and stays firing; it does not fire and resolve at
every evaluation. A value of None (no sensor, too few requests in the window)
counts as not above the threshold and as clear.

The caller passes both clocks: ``now`` (time.monotonic, for durations, immune to
the wall clock being set) and ``wall`` (time.time, for the ``since`` and ``at``
an operator reads). `CounterWindow` and `quantile` turn the cumulative counters
the agent keeps into what happened within a window.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from .settings import RuleSettings


class AlertState(StrEnum):
    INACTIVE = "inactive"
    PENDING = "pending"
    FIRING = "firing"


@dataclass(frozen=True)
class Transition:
    """An alert started firing or resolved: what is published."""

    rule: str
    #: "firing" or "resolved"
    state: str
    severity: str
    value: float | None
    threshold: float
    #: the level it had to come back to (resolved) or will have to (firing)
    resolve: float
    #: wall time the alert started firing (on both messages)
    since: float
    #: wall time of this transition
    at: float


@dataclass
class RuleTracker:
    """One rule's state between evaluations."""

    rule: str
    state: AlertState = AlertState.INACTIVE
    value: float | None = None
    severity: str = "warning"
    #: monotonic time the value went above the threshold (pending) / stayed clear since
    pending_since: float | None = None
    clear_since: float | None = None
    #: wall time it started firing
    firing_since: float | None = None

    @property
    def firing(self) -> bool:
        return self.state is AlertState.FIRING

    def update(self, settings: RuleSettings, value: float | None, now: float, wall: float) -> Transition | None:
        """Feed one value; returns the transition it caused, if any."""
        self.value = value
        if not settings.enabled:
            if self.firing:
                return self._resolve(settings, wall)
            self._reset()
            return None
        above = value is not None and value > settings.threshold
        clear = value is None or value <= settings.resolve_at
        if self.state is AlertState.FIRING:
            self.severity = settings.severity
            if not clear:
                self.clear_since = None
                return None
            if self.clear_since is None:
                self.clear_since = now
            return self._resolve(settings, wall) if now - self.clear_since >= settings.clear_for_s else None
        if not above:
            self._reset()
            return None
        if self.state is AlertState.INACTIVE:
            self.state, self.pending_since = AlertState.PENDING, now
        assert self.pending_since is not None
        if now - self.pending_since < settings.for_s:
            return None
        self.state, self.firing_since, self.clear_since = AlertState.FIRING, wall, None
        self.severity = settings.severity
        return self._transition("firing", settings, wall)

    def restore_firing(self, since: float, severity: str) -> None:
        """Carry an alert that was firing when the agent stopped into this run (it resolves
        through the usual clear levels, and its retained message is cleared then)."""
        self.state, self.firing_since, self.severity = AlertState.FIRING, since, severity

    def _resolve(self, settings: RuleSettings, wall: float) -> Transition:
        transition = self._transition("resolved", settings, wall)
        self._reset()
        return transition

    def _reset(self) -> None:
        self.state, self.pending_since, self.clear_since, self.firing_since = AlertState.INACTIVE, None, None, None

    def _transition(self, state: str, settings: RuleSettings, wall: float) -> Transition:
        return Transition(self.rule, state, self.severity, self.value, settings.threshold, settings.resolve_at,
                          self.firing_since if self.firing_since is not None else wall, wall)


class AlertBook:
    """Every rule's tracker; `evaluate` feeds them all one round of values."""

    def __init__(self, rules: Sequence[str]) -> None:
        self.trackers = {rule: RuleTracker(rule) for rule in rules}

    def evaluate(self, settings: Mapping[str, RuleSettings], values: Mapping[str, float | None],
                 now: float, wall: float) -> list[Transition]:
        out = []
        for rule, tracker in self.trackers.items():
            transition = tracker.update(settings[rule], values.get(rule), now, wall)
            if transition is not None:
                out.append(transition)
        return out

    def firing(self) -> list[RuleTracker]:
        return [t for t in self.trackers.values() if t.firing]


class CounterWindow:
    """How much a cumulative counter grew within the last `window_s`.

    Keeps (time, value) samples back to the first one at or before the window's
    start (the baseline). A counter that goes down was restarted: the history
    starts again from it.
    """

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, now: float, value: float) -> None:
        if self._samples and value < self._samples[-1][1]:
            self._samples.clear()
        self._samples.append((now, value))

    def increase(self, now: float, window_s: float) -> float:
        start = now - window_s
        while len(self._samples) >= 2 and self._samples[1][0] <= start:
            self._samples.popleft()
        if not self._samples:
            return 0.0
        return self._samples[-1][1] - self._samples[0][1]


class HistogramWindow:
    """A cumulative bucket histogram's counts within the last `window_s` (`CounterWindow` per bucket)."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, tuple[int, ...]]] = deque()

    def add(self, now: float, cumulative: Sequence[int]) -> None:
        counts = tuple(cumulative)
        if self._samples and (len(counts) != len(self._samples[-1][1]) or counts[-1] < self._samples[-1][1][-1]):
            self._samples.clear()
        self._samples.append((now, counts))

    def increase(self, now: float, window_s: float) -> list[int]:
        start = now - window_s
        while len(self._samples) >= 2 and self._samples[1][0] <= start:
            self._samples.popleft()
        if not self._samples:
            return []
        first, last = self._samples[0][1], self._samples[-1][1]
        return [b - a for a, b in zip(first, last, strict=True)]


def quantile(q: float, bounds: Sequence[float], cumulative: Sequence[int]) -> float | None:
    """The q-quantile of a cumulative bucket histogram (the +Inf bucket last), interpolated
    linearly within the bucket as Prometheus's ``histogram_quantile`` does; None when empty.
    A quantile in the +Inf bucket is the highest finite bound."""
    if not cumulative or cumulative[-1] <= 0:
        return None
    rank = q * cumulative[-1]
    below, lower = 0, 0.0
    for bound, count in zip([*bounds, math.inf], cumulative, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return float(bounds[-1]) if bounds else None
            if count == below:
                return float(bound)
            return lower + (bound - lower) * (rank - below) / (count - below)
        below, lower = count, float(bound)
    return float(bounds[-1]) if bounds else None
