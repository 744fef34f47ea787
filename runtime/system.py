"""System metrics from psutil: CPU, memory, swap, the state directory's disk, load,
temperatures, network, and the agent's own CPU and memory.

Utilisation is computed from `cpu_times` deltas between two samples with our own
bookkeeping (psutil's `cpu_percent(interval=None)` keeps one global "last call",
which two readers would disturb). Sampling reads /proc: call it off the event loop.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import psutil


@dataclass(frozen=True)
class SystemSample:
    at: float
    #: busy share of all CPUs and of each logical CPU since the previous sample, 0..1
    cpu_utilization: float
    cpu_utilization_per_cpu: tuple[float, ...]
    cpu_count: int
    load_1m: float
    load_5m: float
    load_15m: float
    memory_total_bytes: int
    memory_used_bytes: int
    memory_available_bytes: int
    swap_total_bytes: int
    swap_used_bytes: int
    disk_path: str
    disk_total_bytes: int
    disk_used_bytes: int
    disk_free_bytes: int
    #: sensor label -> degrees Celsius; empty where the machine exposes no sensors
    temperatures_c: dict[str, float]
    #: all interfaces but loopback, since boot
    network_rx_bytes: int
    network_tx_bytes: int
    network_rx_errors: int
    network_tx_errors: int
    #: this process: CPU seconds since it started, share of one CPU since the previous sample, memory
    process_cpu_seconds: float
    process_cpu_utilization: float
    process_rss_bytes: int
    process_threads: int
    process_open_fds: int
    system_uptime_s: float
    process_uptime_s: float
    #: the last figures read that could not be read (name -> reason)
    unavailable: dict[str, str] = field(default_factory=dict)


class SystemMonitor:
    def __init__(self, disk_path: str) -> None:
        self.disk_path = disk_path
        self._process = psutil.Process()
        self._last_total = psutil.cpu_times()
        self._last_per_cpu = psutil.cpu_times(percpu=True)
        self._last_process = self._process.cpu_times()
        self._last_t = time.monotonic()

    def sample(self) -> SystemSample:
        now = time.monotonic()
        total, per_cpu = psutil.cpu_times(), psutil.cpu_times(percpu=True)
        utilization = _busy(self._last_total, total)
        per = tuple(_busy(a, b) for a, b in zip(self._last_per_cpu, per_cpu, strict=False))
        self._last_total, self._last_per_cpu = total, per_cpu
        proc_times = self._process.cpu_times()
        elapsed = max(1e-9, now - self._last_t)
        proc_util = ((proc_times.user + proc_times.system) - (self._last_process.user + self._last_process.system)
                     ) / elapsed
        self._last_process, self._last_t = proc_times, now
        unavailable: dict[str, str] = {}
        load = os.getloadavg()
        memory, swap = psutil.virtual_memory(), psutil.swap_memory()
        try:
            disk = psutil.disk_usage(self.disk_path)
            disk_figures = (disk.total, disk.used, disk.free)
        except OSError as exc:
            unavailable["disk"] = f"{self.disk_path}: {exc.strerror}"
            disk_figures = (0, 0, 0)
        temperatures: dict[str, float] = {}
        try:
            for chip, entries in (psutil.sensors_temperatures() or {}).items():
                for i, entry in enumerate(entries):
                    temperatures[f"{chip}/{entry.label or i}"] = float(entry.current)
        except (OSError, AttributeError) as exc:
            unavailable["temperatures"] = str(exc)
        if not temperatures:
            unavailable.setdefault("temperatures", "no temperature sensors exposed")
        rx = tx = rx_err = tx_err = 0
        for nic, counters in psutil.net_io_counters(pernic=True).items():
            if nic == "lo":
                continue
            rx, tx = rx + counters.bytes_recv, tx + counters.bytes_sent
            rx_err, tx_err = rx_err + counters.errin, tx_err + counters.errout
        with self._process.oneshot():
            rss = self._process.memory_info().rss
            threads = self._process.num_threads()
            fds = self._process.num_fds()
            created = self._process.create_time()
        wall = time.time()
        return SystemSample(
            at=wall,
            cpu_utilization=utilization,
            cpu_utilization_per_cpu=per,
            cpu_count=len(per_cpu),
            load_1m=load[0], load_5m=load[1], load_15m=load[2],
            memory_total_bytes=memory.total,
            memory_used_bytes=memory.total - memory.available,
            memory_available_bytes=memory.available,
            swap_total_bytes=swap.total,
            swap_used_bytes=swap.used,
            disk_path=self.disk_path,
            disk_total_bytes=disk_figures[0], disk_used_bytes=disk_figures[1], disk_free_bytes=disk_figures[2],
            temperatures_c=temperatures,
            network_rx_bytes=rx, network_tx_bytes=tx, network_rx_errors=rx_err, network_tx_errors=tx_err,
            process_cpu_seconds=proc_times.user + proc_times.system,
            process_cpu_utilization=max(0.0, proc_util),
            process_rss_bytes=rss,
            process_threads=threads,
            process_open_fds=fds,
            system_uptime_s=wall - psutil.boot_time(),
            process_uptime_s=wall - created,
            unavailable=unavailable,
        )


def _busy(before: Any, after: Any) -> float:
    total = sum(after) - sum(before)
    if total <= 0:
        return 0.0
    idle = (after.idle + getattr(after, "iowait", 0.0)) - (before.idle + getattr(before, "iowait", 0.0))
    return min(1.0, max(0.0, 1.0 - idle / total))
