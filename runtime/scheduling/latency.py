"""Fixed-bucket latency histograms kept by the runtime: time to first token, time per
output token, request duration.

Plain counts, no metrics library: /metrics turns them into Prometheus histograms
and telemetry sends count, sum and the buckets, from the same numbers.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

#: Upper bounds in seconds (Prometheus ``le``); the last bucket, +Inf, is implicit.
LATENCY_BUCKETS_S: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
#: OpenTelemetry's advice for `gen_ai.server.time_per_output_token`.
TIME_PER_OUTPUT_TOKEN_BUCKETS_S: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
#: OpenTelemetry's advice for `gen_ai.server.request.duration`, doubled on twice more: a long
#: answer on a small CPU takes minutes.
REQUEST_DURATION_BUCKETS_S: tuple[float, ...] = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92, 163.84, 327.68)


@dataclass
class LatencyHistogram:
    bounds: tuple[float, ...] = LATENCY_BUCKETS_S
    #: counts per bucket (not cumulative); one more than `bounds` for +Inf
    counts: list[int] = field(default_factory=list)
    count: int = 0
    sum_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.sum_s += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """(``le``, cumulative count) pairs, +Inf last: Prometheus's form."""
        out, running = [], 0
        for bound, n in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out
