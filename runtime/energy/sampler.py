"""Samples energy and system figures on a timer, for /metrics and telemetry alike.

One task per agent: every `energy_interval_s` it reads the energy meter and the
CPU seconds of the agent and of the whole machine (`CpuClock`), and accounts the
window to the models busy in it, as far as the agent's CPU share explains it
(`Attribution`); every
`system_interval_s` it takes a psutil sample. Reads run in a worker thread (sysfs,
/proc and NVML calls block); the snapshots it keeps are replaced whole, so
readers on the loop thread see one consistent sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from runtime.energy import Attribution, AttributionSnapshot, EnergyMeter, EnergySnapshot
from runtime.energy.cpu_share import CpuClock, CpuWindow
from runtime.energy.meter import Window
from runtime.registry import ModelRegistry
from runtime.system import SystemMonitor, SystemSample

log = logging.getLogger(__name__)


class Sampler:
    def __init__(self, models: ModelRegistry, meter: EnergyMeter, monitor: SystemMonitor,
                 energy_interval_s: float = 1.0, system_interval_s: float = 10.0) -> None:
        self.models = models
        self.meter = meter
        self.monitor = monitor
        self.energy_interval_s = energy_interval_s
        self.system_interval_s = system_interval_s
        self.attribution = Attribution()
        self.cpu = CpuClock()
        self.energy: EnergySnapshot | None = None
        self.system: SystemSample | None = None
        self._task: asyncio.Task[None] | None = None

    def attributed(self) -> AttributionSnapshot:
        return self.attribution.snapshot()

    async def start(self) -> None:
        await self.sample_energy()  # the baseline
        self.system = await asyncio.to_thread(self.monitor.sample)
        self._task = asyncio.create_task(self._run(), name="telemetry-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self.meter.close)

    async def sample_energy(self) -> None:
        window, cpu = await asyncio.to_thread(self._read_window)
        # busy times are read on the loop thread, right after the window closed
        self.attribution.window(window.seconds, window.joules, self.models.busy_seconds(), cpu)
        self.energy = self.meter.snapshot()

    def _read_window(self) -> tuple[Window, CpuWindow]:
        """The energy and the CPU seconds of one window, read back to back (worker thread)."""
        return self.meter.sample(), self.cpu.sample()

    async def _run(self) -> None:
        next_system = time.monotonic() + self.system_interval_s
        while True:
            await asyncio.sleep(self.energy_interval_s)
            try:
                await self.sample_energy()
                if time.monotonic() >= next_system:
                    next_system += self.system_interval_s
                    self.system = await asyncio.to_thread(self.monitor.sample)
            except asyncio.CancelledError:
                raise
            except Exception:  # a sensor's bug must not end sampling
                log.exception("telemetry: sampling failed")
