"""A full disk, for real: a 2 MiB tmpfs as the state dir (root only: mount(8)).

While serving, telemetry that cannot store its records says so once (and once when it
clears), still sends them while the broker is there, counts the ones lost, and reports
it in /metrics, in the records themselves, in /readyz (still ready: serving is not
affected) and in `edgefleet doctor`'s check. `serve --demo` on a full disk exits with
one line and leaves no partial file behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import EMBED, demo_config, free_port, start_agent
from mqtt_broker import Watcher

from agent.config import TelemetryConfig
from sync.mqtt import MqttSettings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the filesystem is full; returns it (delete it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return filler


def telemetry_records(watcher: Watcher, topic: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in watcher.on(topic)]


async def wait_record(watcher: Watcher, topic: str, predicate, timeout_s: float = 30.0) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        for record in reversed(telemetry_records(watcher, topic)):
            if predicate(record):
                return record
        assert loop.time() < deadline, telemetry_records(watcher, topic)[-1:]
        await asyncio.sleep(0.1)


async def test_telemetry_on_a_full_disk_says_it_once_counts_what_is_lost_and_reports_it(
        tiny_disk, state_dir, mqtt_broker, caplog):
    state = tiny_disk / "state"
    state.mkdir()
    (state / "models").symlink_to(state_dir / "models")
    config = replace(
        demo_config(state, models=(EMBED,)),
        mqtt=MqttSettings(host=mqtt_broker.host, port=mqtt_broker.port, device_id="full-1", group="lab",
                          reconnect_min_s=0.2, reconnect_max_s=0.5, keepalive_s=5),
        telemetry=TelemetryConfig(interval_s=0.2, energy_sample_s=0.1))
    topic = "edgefleet/v1/devices/full-1/telemetry"
    caplog.set_level(logging.INFO, logger="sync.telemetry")
    with Watcher(mqtt_broker, topic) as watcher:
        async with start_agent(config) as agent:
            await wait_record(watcher, topic, lambda r: r["models"].get(EMBED, {}).get("state") == "ready")
            filler = fill(tiny_disk)
            # the records go on, straight to the broker, and say why they are not stored
            failing = await wait_record(watcher, topic, lambda r: r["telemetry"]["storage_error"] is not None)
            assert "full" in failing["telemetry"]["storage_error"]
            later = await wait_record(watcher, topic, lambda r: r["seq"] >= failing["seq"] + 5)
            assert later["telemetry"]["storage_error"] == failing["telemetry"]["storage_error"]
            status, body = await agent.get("/readyz")
            assert status == 200 and body["status"] == "ready"  # serving is not affected
            assert body["telemetry"]["storage"] == "failing" and "full" in body["telemetry"]["reason"]
            assert await agent.metric("edgefleet_telemetry_storage_failing") == 1
            status, _, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": "still serving"})
            assert status == 200

            # with the broker away as well, records are lost: counted, not hidden
            await asyncio.to_thread(mqtt_broker.stop)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while await agent.metric("edgefleet_telemetry_records_lost_total") < 3:
                assert loop.time() < deadline
                await asyncio.sleep(0.1)
            await asyncio.to_thread(mqtt_broker.start)
            filler.unlink()  # the operator frees space
            recovered = await wait_record(watcher, topic, lambda r: r["telemetry"]["storage_error"] is None
                                          and r["seq"] > later["seq"] and r["telemetry"]["outbox_queued"] == 0)
            lost = await agent.metric("edgefleet_telemetry_records_lost_total")
            assert recovered["telemetry"]["records_lost"] == lost >= 3
            assert await agent.metric("edgefleet_telemetry_storage_failing") == 0
            status, body = await agent.get("/readyz")
            assert status == 200 and body["telemetry"]["storage"] == "ok"
            assert body["telemetry"]["records_lost"] == lost

    from agent.cli.doctor import Level, check_telemetry_outbox

    (finding,) = check_telemetry_outbox(state)
    assert finding.level is Level.WARN and f"{int(lost)} telemetry records" in finding.detail

    telemetry_logs = [r for r in caplog.records if r.name.startswith("sync.telemetry")]
    assert not any(r.exc_info for r in telemetry_logs), "no tracebacks"
    started = [r for r in telemetry_logs if "cannot store" in r.getMessage()]
    cleared = [r for r in telemetry_logs if "storing records again" in r.getMessage()]
    assert len(started) == 1 and started[0].levelno == logging.ERROR, [r.getMessage() for r in telemetry_logs]
    assert len(cleared) == 1 and f"{int(lost)} lost" in cleared[0].getMessage()


def test_serve_demo_on_a_full_disk_says_so_in_one_line_and_leaves_no_partial_file(tiny_disk, tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(f"[server]\nport = {free_port()}\n")
    state = tiny_disk / "state"
    done = subprocess.run([sys.executable, "-m", "agent", "serve", "--demo", "--config", str(config),
                           "--state-dir", str(state)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("edgefleet:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "no space left" in errors[0].lower() and str(state) in errors[0], errors[0]
    left = [(str(p), p.stat().st_size) for p in tiny_disk.rglob("*") if p.is_file()]
    assert sum(size for _, size in left) < 64 * 1024, left  # no 2 MiB partial copy of the model
    assert not [p for p, _ in left if ".tmp" in p], left
    assert os.statvfs(tiny_disk).f_bfree * os.statvfs(tiny_disk).f_frsize > 1024 * 1024
