"""The estimate used where nothing is measured: a linear CPU power model.

    P = logical CPUs x (idle_w + utilisation x (max_w - idle_w))

with Cloud Carbon Footprint's average coefficients per vCPU (idle 0.74 W, full load
3.5 W) unless configured. It covers the CPUs only (no memory, disks, fans, GPU) and
is marked `estimated` with the model's name wherever it appears.
"""

from __future__ import annotations

import psutil

from .sources import DomainReading, Method

CCF_IDLE_W_PER_CPU = 0.74
CCF_MAX_W_PER_CPU = 3.5


class CpuEstimateSource:
    name = "estimate"
    method: Method = "estimated"

    def __init__(self, idle_w_per_cpu: float = CCF_IDLE_W_PER_CPU, max_w_per_cpu: float = CCF_MAX_W_PER_CPU) -> None:
        self.idle_w = idle_w_per_cpu
        self.max_w = max_w_per_cpu
        self.cpus = psutil.cpu_count(logical=True) or 1
        self.model = (f"linear-cpu (Cloud Carbon Footprint coefficients): {self.cpus} CPUs x "
                      f"({self.idle_w} W + utilisation x {self.max_w - self.idle_w:.2f} W)")
        self.description = f"CPUs only, estimated: {self.model}"
        self._last = psutil.cpu_times()

    def utilisation(self) -> float:
        """Machine-wide CPU busy share since the previous call, 0..1 (own bookkeeping, so other
        psutil users are not disturbed)."""
        now = psutil.cpu_times()
        last, self._last = self._last, now
        total = sum(now) - sum(last)
        idle = (now.idle + getattr(now, "iowait", 0.0)) - (last.idle + getattr(last, "iowait", 0.0))
        return 0.0 if total <= 0 else min(1.0, max(0.0, 1.0 - idle / total))

    def watts(self, utilisation: float) -> float:
        return self.cpus * (self.idle_w + utilisation * (self.max_w - self.idle_w))

    def read(self) -> list[DomainReading]:
        return [DomainReading("cpu", "power", self.watts(self.utilisation()))]

    def close(self) -> None:
        pass
