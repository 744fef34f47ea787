"""Whose CPU work a window's energy paid for: the agent's own, or other processes'.

A power sensor measures the whole package (or board), whatever runs on it. A package
build beside the agent draws power too, and if each window's active energy went to the
models busy in it, the build would be billed to them. So each energy window also takes
the CPU seconds the agent's process used (`os.times()`: every thread, llama.cpp's and
onnxruntime's included) and the machine's busy CPU seconds (`psutil.cpu_times()`, all
CPUs: everything but idle, iowait and steal; guest time is already inside user). Their
ratio is the share of active energy the agent explains; attribution (attribution.py)
bills only that share to models and leaves the rest as ``other``.

Readings are blocking /proc reads: the sampler takes them in its worker thread, right
after the energy reading, so both cover the same window.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class CpuWindow:
    """CPU seconds in one energy window: the agent's process, and the whole machine's busy time."""

    process_s: float
    busy_s: float

    @property
    def agent_share(self) -> float:
        """The share of the machine's CPU work that was the agent's, 0..1. With no busy time
        at all nothing tells the work apart, and the window's energy stays with who was busy (1.0)."""
        if self.busy_s <= 0:
            return 1.0
        return min(1.0, max(0.0, self.process_s / self.busy_s))


def machine_busy_seconds() -> float:
    """Busy CPU seconds since boot, summed over all CPUs."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0) + getattr(t, "steal", 0.0)
    guest = getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)  # counted in user already (Linux)
    return max(0.0, sum(t) - idle - guest)


def process_seconds() -> float:
    """This process's user + system CPU seconds, all threads."""
    t = os.times()
    return t.user + t.system


class CpuClock:
    """Takes `CpuWindow`s: the CPU seconds since the previous `sample` (or construction)."""

    def __init__(self) -> None:
        self._last = (process_seconds(), machine_busy_seconds())

    def sample(self) -> CpuWindow:
        now = (process_seconds(), machine_busy_seconds())
        last, self._last = self._last, now
        return CpuWindow(max(0.0, now[0] - last[0]), max(0.0, now[1] - last[1]))
