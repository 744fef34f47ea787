"""Per-model energy beside other processes: a serving agent and a CPU hog share the machine.

The package power comes from a fake powercap RAPL tree in a temp dir whose counter a
thread advances the way the real one does: an idle floor plus a part that follows the
whole machine's CPU use (every process's, not only the agent's). The agent reads it
through its RAPL source, as on a machine with RAPL. Only the share of active energy the
agent's own CPU time explains may be billed to the model; the rest is "other".
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from conftest import CHAT, demo_config, start_agent

import agent.fleet.telemetry as fleet_telemetry
from agent.config import TelemetryConfig
from runtime.energy import Attribution, EnergyMeter
from runtime.energy.rapl import RaplSource

IDLE_W = 4.0
#: what one fully busy logical CPU adds to the package power
PER_CPU_W = 10.0


class FakeRapl:
    """A powercap tree whose package counter follows the machine's CPU use, like the real one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        zone = root / "intel-rapl:0"
        zone.mkdir(parents=True)
        (zone / "name").write_text("package-0\n")
        (zone / "max_energy_range_uj").write_text("262143328850\n")
        self.counter = zone / "energy_uj"
        self.energy_uj = 0.0
        self._write()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-rapl", daemon=True)

    def _write(self) -> None:
        temp = self.counter.with_suffix(".tmp")
        temp.write_text(f"{int(self.energy_uj)}\n")
        os.replace(temp, self.counter)  # a reader never sees half a number

    def _run(self) -> None:
        last, last_t = psutil.cpu_times(), time.monotonic()
        while not self._stop.wait(0.05):
            now, t = psutil.cpu_times(), time.monotonic()
            busy = (sum(now) - now.idle - now.iowait) - (sum(last) - last.idle - last.iowait)
            dt = t - last_t
            self.energy_uj += (IDLE_W * dt + PER_CPU_W * max(0.0, busy)) * 1e6
            self._write()
            last, last_t = now, t

    def __enter__(self) -> FakeRapl:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def start_hogs(count: int) -> list[subprocess.Popen[bytes]]:
    """Busy loops in their own processes: a package build beside the agent, as far as the CPU sees."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def stop_hogs(hogs: list[subprocess.Popen[bytes]]) -> None:
    for hog in hogs:
        hog.send_signal(signal.SIGKILL)
    for hog in hogs:
        hog.wait()


async def energy(agent) -> dict[str, float]:  # type: ignore[no-untyped-def]
    _, text = await agent.get("/metrics")  # one scrape: the parts must add up within it
    metric = functools.partial(agent.metric_in, str(text))
    return {
        "active": metric("edgefleet_host_energy_joules_total", part="active"),
        "idle": metric("edgefleet_host_energy_joules_total", part="idle"),
        "total": metric("edgefleet_energy_joules_total"),
        "chat": metric("edgefleet_model_energy_joules_total", model=CHAT, part="active"),
        "models": metric("edgefleet_active_energy_joules_total", by="models"),
        "agent": metric("edgefleet_active_energy_joules_total", by="agent"),
        "other": metric("edgefleet_active_energy_joules_total", by="other"),
    }


async def test_a_cpu_hog_beside_a_serving_agent_is_other_energy_not_the_models(state_dir, tmp_path, monkeypatch):
    rapl_root = tmp_path / "powercap"
    with FakeRapl(rapl_root):
        monkeypatch.setattr(fleet_telemetry, "default_meter", lambda *args, **kwargs: EnergyMeter(
            host=[lambda: RaplSource(rapl_root)], accelerators=[], fallback=None))
        config = replace(demo_config(tmp_path / "state", models=(CHAT,)),
                         telemetry=TelemetryConfig(interval_s=1.0, energy_sample_s=0.25))
        (tmp_path / "state").mkdir()
        (tmp_path / "state" / "models").symlink_to(state_dir / "models")
        async with start_agent(config) as agent:
            await asyncio.sleep(1.0)  # a few idle windows: the idle baseline
            hogs = start_hogs(os.cpu_count() or 1)
            try:
                before = await energy(agent)
                end = asyncio.get_running_loop().time() + 8.0
                while asyncio.get_running_loop().time() < end:  # the model busy the whole time
                    status, body, _ = await agent.post("/v1/chat/completions", json={
                        "model": CHAT, "messages": [{"role": "user", "content": "Tell me about the sea."}],
                        "max_tokens": 32, "temperature": 0})
                    assert status == 200, body
                await asyncio.sleep(0.6)  # the last window is accounted
                after = await energy(agent)
            finally:
                stop_hogs(hogs)
    d = {key: after[key] - before[key] for key in after}
    assert d["active"] > 1.0, d  # the hogs and the model drew well above the idle floor
    # the device's own total is untouched: idle + active is everything the counter gave
    assert d["idle"] + d["active"] == pytest.approx(d["total"], rel=0.02, abs=0.05)
    # the hogs had about half the CPUs: their work is "other", not billed to the chat model
    assert d["chat"] <= 0.75 * d["active"], d
    assert d["other"] >= 0.25 * d["active"], d
    # what the active energy went to adds up: models + the agent between requests + other processes
    assert d["models"] + d["agent"] + d["other"] == pytest.approx(d["active"], rel=0.02, abs=0.05)
    assert d["chat"] == pytest.approx(d["models"], rel=0.02, abs=0.05)


def test_attribution_bills_a_model_only_the_agents_share_of_the_cpu():
    from runtime.energy.cpu_share import CpuWindow

    a = Attribution()
    a.window(0.0, None, {"chat": 0.0})
    a.window(1.0, 5.0, {"chat": 0.0}, CpuWindow(process_s=0.01, busy_s=0.02))  # idle: learns 5 W
    a.window(1.0, 25.0, {"chat": 1.0}, CpuWindow(process_s=0.5, busy_s=2.0))  # the agent used a quarter
    snap = a.snapshot()
    assert snap.active_j == pytest.approx(20.0)
    assert snap.models["chat"].energy_j == pytest.approx(5.0)
    assert snap.models_j == pytest.approx(5.0) and snap.other_j == pytest.approx(15.0)
    assert snap.models["chat"].energy_incl_idle_j == pytest.approx(5.0 + 5.0)  # the idle floor is the device's
    a.window(1.0, 15.0, {"chat": 2.0}, CpuWindow(process_s=0.4, busy_s=0.4))  # alone on the machine
    snap = a.snapshot()
    assert snap.models["chat"].energy_j == pytest.approx(15.0) and snap.other_j == pytest.approx(15.0)
    assert snap.total_j == pytest.approx(snap.idle_j + snap.models_j + snap.agent_j + snap.other_j)
