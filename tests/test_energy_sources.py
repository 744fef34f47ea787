"""Energy sources against fake sysfs trees and NVML behind its own module interface,
the counter rules (baseline, wraparound, reset, implausible), the estimate on this
machine, and attribution of measured joules to models."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pynvml
import pytest

from runtime.energy import Attribution, EnergyMeter, SourceUnavailable, nvml
from runtime.energy.battery import BatterySource
from runtime.energy.estimate import CpuEstimateSource
from runtime.energy.hwmon import HwmonSource
from runtime.energy.meter import default_meter
from runtime.energy.nvml import NvmlSource
from runtime.energy.rapl import RaplSource


def write(root: Path, files: dict[str, str | int]) -> Path:
    for name, value in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")
    return root


def rapl_tree(root: Path, package_uj: int, dram_uj: int, max_uj: int | None = 262_143_328_850) -> Path:
    files: dict[str, str | int] = {
        "intel-rapl:0/name": "package-0", "intel-rapl:0/energy_uj": package_uj,
        "intel-rapl:0:0/name": "core", "intel-rapl:0:0/energy_uj": 5,   # inside the package: not counted
        "intel-rapl:0:1/name": "dram", "intel-rapl:0:1/energy_uj": dram_uj,
    }
    if max_uj is not None:
        files["intel-rapl:0/max_energy_range_uj"] = max_uj
        files["intel-rapl:0:1/max_energy_range_uj"] = max_uj
    return write(root, files)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def meter_of(factory, clock: Clock) -> EnergyMeter:  # type: ignore[no-untyped-def]
    return EnergyMeter(host=[factory], accelerators=[], fallback=None, clock=clock)


def test_rapl_counts_package_and_dram_and_handles_wraparound(tmp_path):
    max_uj = 1_000_000_000  # a 1 kJ range, to wrap soon
    rapl_tree(tmp_path, 999_000_000, 10_000_000, max_uj)
    clock = Clock()
    meter = meter_of(lambda: RaplSource(tmp_path), clock)
    first = meter.sample()
    assert first.joules is None  # the first reading is a baseline, not energy
    clock.t += 1
    write(tmp_path, {"intel-rapl:0/energy_uj": 19_000_000, "intel-rapl:0:1/energy_uj": 12_000_000})  # wrapped
    window = meter.sample()
    assert window.joules == pytest.approx(20.0 + 2.0)  # (1000 - 999 + 19) J package + 2 J dram
    snap = meter.snapshot()
    package = next(d for d in snap.domains if d.domain == "package-0")
    assert package.wraps == 1 and package.resets == 0 and package.energy_j == pytest.approx(20.0)
    assert package.power_w == pytest.approx(20.0)
    assert {d.domain for d in snap.domains} == {"package-0", "dram-0"}
    assert snap.method == "measured" and snap.total_j == pytest.approx(22.0) and snap.power_w == pytest.approx(22.0)


def test_a_counter_that_goes_down_without_a_range_is_a_reset_and_that_sample_is_dropped(tmp_path):
    rapl_tree(tmp_path, 50_000_000, 1_000_000, max_uj=None)
    clock = Clock()
    meter = meter_of(lambda: RaplSource(tmp_path), clock)
    meter.sample()
    clock.t += 1
    write(tmp_path, {"intel-rapl:0/energy_uj": 3_000_000, "intel-rapl:0:1/energy_uj": 2_000_000})
    assert meter.sample().joules is None  # no joules made up, none negative
    clock.t += 1
    write(tmp_path, {"intel-rapl:0/energy_uj": 8_000_000, "intel-rapl:0:1/energy_uj": 3_000_000})
    assert meter.sample().joules == pytest.approx(5.0 + 1.0)  # counted again from the new baseline
    package = next(d for d in meter.snapshot().domains if d.domain == "package-0")
    assert package.resets == 1 and package.dropped_samples == 1 and package.energy_j == pytest.approx(5.0)


def test_an_implausible_jump_is_dropped_not_counted(tmp_path):
    rapl_tree(tmp_path, 1_000_000, 1_000_000)
    clock = Clock()
    meter = meter_of(lambda: RaplSource(tmp_path), clock)
    meter.sample()
    clock.t += 1
    write(tmp_path, {"intel-rapl:0/energy_uj": 1_000_000 + 50_000 * 10**6})  # 50 kJ in one second
    assert meter.sample().joules is None
    assert meter.snapshot().total_j == pytest.approx(0.0)


def _as_unprivileged(fn) -> str:  # type: ignore[no-untyped-def]
    """Run `fn` in a forked child that is not root (nobody), as the agent's service user
    would be; root reads any file, whatever its mode. Returns what `fn` returned (a str)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no event loop; leave with os._exit whatever happens
        code = 1
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            os.write(write_end, fn().encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        out = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return out


def test_rapl_readable_by_root_only_is_unavailable_with_the_reason():
    base = Path(tempfile.mkdtemp(prefix="rapl-denied-"))
    try:
        os.chmod(base, 0o755)
        rapl_tree(base, 1, 1)
        for energy in base.glob("*/energy_uj"):
            os.chmod(energy, 0o400)  # what Linux >= 5.10 does

        def probe() -> str:
            meter = EnergyMeter(host=[lambda: RaplSource(base)], accelerators=[], fallback=CpuEstimateSource)
            meter.sample()
            snap = meter.snapshot()
            return f"{snap.method}\n{snap.sources[0].available} {snap.sources[0].reason}"

        method, status = _as_unprivileged(probe).splitlines()
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)
    assert method == "estimated"  # it falls back, and says so
    assert status.startswith("False ") and "permission denied" in status and "root" in status


def test_hwmon_ina3221_rails_count_the_board_input_only(tmp_path):
    write(tmp_path, {
        "hwmon0/name": "ina3221",
        "hwmon0/in1_label": "VDD_IN", "hwmon0/in1_input": 5000, "hwmon0/curr1_input": 1200,   # 6 W
        "hwmon0/in2_label": "VDD_CPU_GPU_CV", "hwmon0/in2_input": 5000, "hwmon0/curr2_input": 400,
        "hwmon0/in3_label": "VDD_SOC", "hwmon0/in3_input": 5000, "hwmon0/curr3_input": 300,
        "hwmon1/name": "acpitz", "hwmon1/temp1_input": 40000,
    })
    clock = Clock()
    meter = meter_of(lambda: HwmonSource(tmp_path), clock)
    meter.sample()
    clock.t += 2
    write(tmp_path, {"hwmon0/curr1_input": 1600})  # 8 W now
    window = meter.sample()
    assert window.joules == pytest.approx((6 + 8) / 2 * 2)  # trapezoid over 2 s, VDD_IN only
    snap = meter.snapshot()
    rails = {d.domain: d for d in snap.domains}
    assert set(rails) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}
    assert rails["VDD_IN"].in_total and not rails["VDD_SOC"].in_total
    assert rails["VDD_CPU_GPU_CV"].power_w == pytest.approx(2.0)
    assert snap.power_w == pytest.approx(8.0)


def test_hwmon_energy_and_power_inputs(tmp_path):
    write(tmp_path, {"hwmon3/name": "amd_energy", "hwmon3/energy1_input": 1_000_000,
                     "hwmon3/energy1_label": "Esocket0",
                     "hwmon4/name": "ina226", "hwmon4/power1_input": 2_500_000})
    clock = Clock()
    meter = meter_of(lambda: HwmonSource(tmp_path), clock)
    meter.sample()
    clock.t += 1
    write(tmp_path, {"hwmon3/energy1_input": 4_000_000})
    assert meter.sample().joules == pytest.approx(3.0 + 2.5)
    assert {d.domain for d in meter.snapshot().domains} == {"amd_energy/Esocket0", "ina226/power1"}


def test_battery_measures_only_while_discharging(tmp_path):
    write(tmp_path, {"AC/type": "Mains", "AC/online": 0,
                     "BAT0/type": "Battery", "BAT0/status": "Discharging", "BAT0/power_now": 9_000_000})
    clock = Clock()
    meter = meter_of(lambda: BatterySource(tmp_path), clock)
    meter.sample()
    clock.t += 10
    assert meter.sample().joules == pytest.approx(90.0)
    write(tmp_path, {"BAT0/status": "Charging"})
    clock.t += 10
    assert meter.sample().joules is None
    snap = meter.snapshot()
    (bat,) = snap.domains
    assert bat.power_w is None  # unavailable, not 0 W
    assert snap.power_w is None
    assert "charging" in (snap.sources[0].reason or "") and not snap.sources[0].available
    assert snap.total_j == pytest.approx(90.0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """NVML's own module functions, answering for one GPU with scripted values."""
    state = {"energy_mj": [1_000_000, 1_050_000, 20_000, 30_000], "supported": True, "power_mw": 150_000}
    handle = object()
    monkeypatch.setattr(nvml, "nvml_library_present", lambda: True)  # the driver's library, as if installed
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: handle)

    def energy(h: object) -> int:
        if not state["supported"]:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        values = state["energy_mj"]
        return values.pop(0) if len(values) > 1 else values[0]

    monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", energy)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerUsage", lambda h: state["power_mw"])
    return state


def test_nvml_total_energy_counter_and_a_driver_reload(fake_gpu):
    clock = Clock()
    meter = EnergyMeter(host=[], accelerators=[NvmlSource], fallback=None, clock=clock)
    # probing read the counter twice (support check + first read); the meter's baseline is next
    fake_gpu["energy_mj"][:] = [2_000_000, 2_050_000, 100, 5_100]
    meter.sample()
    clock.t += 1
    assert meter.sample().joules == pytest.approx(50.0)
    clock.t += 1
    assert meter.sample().joules is None  # went down: the driver reloaded; no negative energy
    clock.t += 1
    assert meter.sample().joules == pytest.approx(5.0)
    (gpu,) = meter.snapshot().domains
    assert gpu.domain == "gpu-0" and gpu.resets == 1 and gpu.energy_j == pytest.approx(55.0)


def test_nvml_without_the_energy_counter_integrates_power(fake_gpu):
    fake_gpu["supported"] = False
    clock = Clock()
    meter = EnergyMeter(host=[], accelerators=[NvmlSource], fallback=None, clock=clock)
    meter.sample()
    clock.t += 2
    fake_gpu["power_mw"] = 250_000
    assert meter.sample().joules == pytest.approx((150 + 250) / 2 * 2)


def test_nvml_without_a_driver_is_unavailable_with_nvmls_reason(monkeypatch):
    def no_library() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(nvml, "nvml_library_present", lambda: True)  # a library NVML itself then refuses
    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    with pytest.raises(SourceUnavailable, match="NVML"):
        NvmlSource()


def test_without_the_nvidia_library_pynvml_is_not_imported(monkeypatch):
    monkeypatch.setattr(nvml, "NVML_LIBRARY", "libnvidia-ml-absent.so.1")  # a name no machine has
    monkeypatch.delitem(sys.modules, "pynvml")
    with pytest.raises(SourceUnavailable, match="no NVIDIA driver") as refused:
        NvmlSource()
    assert refused.value.code == "absent" and "pynvml" not in sys.modules  # never holds its 4 MiB for nothing


def test_the_estimate_on_this_machine_says_it_is_an_estimate_and_names_its_model():
    meter = default_meter()
    meter.sample()
    snap = meter.snapshot()
    host = [s for s in snap.sources if s.name in ("rapl", "hwmon", "battery")]
    if not any(s.used for s in host):  # this VM: no powercap, no hwmon, no battery
        assert snap.method in ("estimated", "mixed")
        assert snap.estimate_model and "Cloud Carbon Footprint" in snap.estimate_model
        assert all(s.reason for s in host)  # each one says why not
        (cpu,) = [d for d in snap.domains if d.source == "estimate"]
        source = CpuEstimateSource()
        assert source.watts(0.0) <= (cpu.power_w or 0.0) <= source.watts(1.0)
    else:
        assert snap.method in ("measured", "mixed")


def test_attribution_keeps_idle_apart_and_splits_active_energy_by_busy_time():
    a = Attribution()
    a.window(0.0, None, {"chat": 0.0, "embed": 0.0})  # the meter's baseline: first sight of each model
    a.window(1.0, 5.0, {"chat": 0.0, "embed": 0.0})   # idle: learns 5 W
    a.window(1.0, 20.0, {"chat": 0.75, "embed": 0.25})  # 15 J above idle, split 3:1
    snap = a.snapshot()
    assert snap.idle_power_w == pytest.approx(5.0) and snap.idle_power_learnt
    assert snap.total_j == pytest.approx(25.0) and snap.idle_j == pytest.approx(10.0)
    assert snap.active_j == pytest.approx(15.0)
    assert snap.models["chat"].energy_j == pytest.approx(11.25)
    assert snap.models["embed"].energy_j == pytest.approx(3.75)
    assert snap.models["chat"].energy_incl_idle_j == pytest.approx(11.25 + 5.0 * 0.75)
    a.window(1.0, None, {"chat": 1.5, "embed": 0.25})  # unknown joules: not attributed, not invented
    assert a.snapshot().unattributed_s == pytest.approx(1.0)
    assert a.snapshot().models["chat"].energy_j == pytest.approx(11.25)
