"""NVIDIA GPUs through NVML (`nvidia-ml-py`, imported as `pynvml`).

Per GPU: the total-energy counter (millijoules since the driver loaded; Volta and
later) where the card supports it, else power samples (milliwatts) that the meter
integrates. A counter that goes down is a driver reload (a reset), handled by the
meter. Without the NVIDIA driver the source is unavailable, with NVML's reason.

pynvml is one large module of ctypes structures (about 4 MiB resident, kept for the
agent's life once imported), so it is imported only where the driver's library
(`NVML_LIBRARY`, the name pynvml itself opens on Linux) can be opened: on a machine
without an NVIDIA GPU the agent never holds it.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import sys
from types import ModuleType
from typing import Any

from .sources import DomainReading, Method, SourceUnavailable

#: What pynvml opens on Linux (on Windows it looks in System32 and Program Files).
NVML_LIBRARY = "libnvidia-ml.so.1"


def nvml_library_present() -> bool:
    """Whether the NVIDIA driver's NVML library can be opened here (True off Linux: pynvml decides)."""
    if not sys.platform.startswith("linux"):
        return True
    try:
        ctypes.CDLL(NVML_LIBRARY)
    except OSError:
        return False
    return True


class NvmlSource:
    name = "nvml"
    method: Method = "measured"
    description = "NVIDIA GPUs, whole board (NVML)"

    def __init__(self) -> None:
        if not nvml_library_present():
            raise SourceUnavailable(f"NVML: {NVML_LIBRARY} not found (no NVIDIA driver)", "absent")
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
