"""NVIDIA GPUs through NVML (`nvidia-ml-py`, imported as `pynvml`).

Per GPU: the total-energy counter (millijoules since the driver loaded; Volta and
later) where the card supports it, else power samples (milliwatts) that the meter
integrates. A counter that goes down is a driver reload (a reset), handled by the
meter. Without the NVIDIA driver the source is unavailable, with NVML's reason.
"""

from __future__ import annotations

import contextlib
import importlib
from types import ModuleType
from typing import Any

from .sources import DomainReading, Method, SourceUnavailable


class NvmlSource:
    name = "nvml"
    method: Method = "measured"
    description = "NVIDIA GPUs, whole board (NVML)"

    def __init__(self) -> None:
        try:
            self._nvml: ModuleType = importlib.import_module("pynvml")
        except ImportError:
            raise SourceUnavailable("nvidia-ml-py (pynvml) is not installed", "absent") from None
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:  # no driver: no NVIDIA GPU here
            raise SourceUnavailable(f"NVML: {exc}", "absent") from None
        try:
            count = nvml.nvmlDeviceGetCount()
            self._gpus: list[tuple[str, Any, bool]] = []
            for index in range(count):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                try:
                    nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                    counter = True
                except nvml.NVMLError:
                    counter = False  # older than Volta, or not supported: integrate power
                self._gpus.append((f"gpu-{index}", handle, counter))
        except nvml.NVMLError as exc:
            nvml.nvmlShutdown()
            raise SourceUnavailable(f"NVML: {exc}") from None
        if not self._gpus:
            nvml.nvmlShutdown()
            raise SourceUnavailable("NVML found no GPU", "absent")

    def read(self) -> list[DomainReading]:
        nvml = self._nvml
        readings = []
        for domain, handle, counter in self._gpus:
            try:
                if counter:
                    mj = nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                    readings.append(DomainReading(domain, "energy", mj / 1e3, None))
                else:
                    mw = nvml.nvmlDeviceGetPowerUsage(handle)
                    readings.append(DomainReading(domain, "power", mw / 1e3))
            except nvml.NVMLError as exc:
                raise SourceUnavailable(f"NVML {domain}: {exc}") from None
        return readings

    def close(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()
