"""SIGKILL at the worst moments: during a download, during verification, during activation.

The agent runs as `edgefleet serve` in its own process, pulling signed releases of the
real embedding model (plus a large extra file, so each step lasts long enough to be
interrupted) over a real mosquitto and a real HTTP mirror of the hub. It is killed when
its own update topic says it entered the step, then started again. Each time it must
serve a complete, verified version as soon as it is up, then finish the update (the
download resumes where it stopped) or, when activation keeps getting killed, give the
version up (rolled back, not retried).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import EMBED, free_port
from mqtt_broker import MosquittoBroker, Watcher, running_broker
from update_env import (
    GROUP_DOORBELL,
    UPDATE_TOPIC,
    Mirror,
    UpdateLog,
    create_hub,
    embedding_state,
    make_release,
    publish_release,
    target_file,
)

from runtime.store import ModelStore
from sync.hub.repository import HubRepository

REPO = Path(__file__).resolve().parent.parent
V1 = "int8-1.0.0"
EXTRA = 64 * 1024 * 1024  # an extra bundle file: makes download and verification take a while
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = embedding_state(tmp_path_factory.mktemp("crash"))
    shutil.copytree(ModelStore(root / "state").version_path(EMBED, V1), root / "v1")  # old versions get pruned
    return root


@pytest.fixture(scope="module")
def broker(env: Path) -> Iterator[MosquittoBroker]:
    with running_broker(env) as broker:
        yield broker


@pytest.fixture(scope="module")
def hub(env: Path) -> HubRepository:
    return create_hub(env / "hub", env / "state", (EMBED,))


@pytest.fixture(scope="module")
async def mirror(hub: HubRepository) -> AsyncIterator[Mirror]:
    async with Mirror(hub.dir / "repository") as mirror:
        yield mirror


@pytest.fixture(scope="module")
def watcher(broker: MosquittoBroker) -> Iterator[Watcher]:
    with Watcher(broker, UPDATE_TOPIC) as w:
        yield w


class AgentProcess:
    """`edgefleet serve --config …` as the service runs it."""

    def __init__(self, env: Path, hub: HubRepository, mirror: Mirror, broker: MosquittoBroker) -> None:
        self.port = free_port()
        self.config = env / "agent.toml"
        self.config.write_text(f"""
state_dir = "{env / "state"}"
[server]
port = {self.port}
[[models]]
name = "{EMBED}"
[mqtt]
host = "{broker.host}"
port = {broker.port}
device_id = "dev-1"
group = "lab"
reconnect_min_s = 0.2
reconnect_max_s = 1.0
[updates]
hub_url = "{mirror.url}"
trust_root = "{hub.dir / "trust-root.json"}"
poll_interval_s = 60
health_checks = 3
health_check_interval_s = 0.5
read_timeout_s = 5
max_activation_attempts = 2
min_free_mb = 0
""")
        self.log = env / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "serve", "--config", str(self.config)], cwd=REPO, stdout=log, stderr=log
            )
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                try:
                    async with session.get(f"http://127.0.0.1:{self.port}/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"agent not ready: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    async def serving(self) -> str:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{self.port}/v2/models/{EMBED}") as resp:
                meta = await resp.json()
            async with session.post(
                f"http://127.0.0.1:{self.port}/v1/embeddings", json={"model": EMBED, "input": ["after a crash"]}
            ) as resp:
                assert resp.status == 200, await resp.text()
        (version,) = meta["versions"]
        return version


@pytest.fixture(scope="module")
async def agent(env: Path, hub: HubRepository, mirror: Mirror, broker: MosquittoBroker) -> AsyncIterator[AgentProcess]:
    process = AgentProcess(env, hub, mirror, broker)
    await process.start()
    yield process
    process.stop()


def journal_state(env: Path) -> str | None:
    jobs = json.loads((env / "state/sync/journal.json").read_text())["jobs"]
    return jobs[EMBED]["state"] if EMBED in jobs else None


def new_release(env: Path, hub: HubRepository, watcher: Watcher, version: str) -> None:
    bundle = make_release(
        env / "v1",
        env / f"rel-{version}",
        version,
        onnx_note=f"release {version}",
        extra={"calibration.bin": os.urandom(EXTRA)},
    )
    result = publish_release(hub, EMBED, bundle)
    watcher.publish(GROUP_DOORBELL, result.doorbell, retain=True)


async def restarted_serving_a_verified_version(agent: AgentProcess, env: Path) -> str:
    await agent.start()
    version = await agent.serving()
    assert ModelStore(env / "state").verify_version(EMBED, version), f"{version} on disk is not what was laid out"
    return version


async def test_killed_while_downloading_resumes_the_download_after_restart(agent, env, hub, mirror, watcher) -> None:
    log = UpdateLog(watcher)
    seq = log.last_seq()
    before = await agent.serving()
    new_release(env, hub, watcher, "d1")
    extra = target_file(hub, EMBED, "d1", "calibration.bin")
    mirror.on(extra.name, throttle_bps=16 * 1024 * 1024)  # four seconds for the extra file
    await log.until(seq, "downloading", EMBED)
    part = ModelStore(env / "state").staging_path(extra.name.split(".", 1)[0])
    while not part.exists() or part.stat().st_size < EXTRA // 4:
        await asyncio.sleep(0.05)
    agent.kill()
    assert journal_state(env) == "downloading"
    had = part.stat().st_size
    assert 0 < had < EXTRA
    mirror.clear()
    assert await restarted_serving_a_verified_version(agent, env) == before
    message = await log.until(seq, "active", EMBED, timeout_s=120)
    assert message["version"] == "d1" and await agent.serving() == "d1"
    ranges = mirror.ranges[next(p for p in mirror.ranges if p.endswith(extra.name))]
    assert ranges[0] is None and ranges[-1] == f"bytes={had}-"  # continued, not started over


async def test_killed_while_verifying_serves_the_old_version_then_finishes(agent, env, hub, watcher) -> None:
    log = UpdateLog(watcher)
    seq = log.last_seq()
    before = await agent.serving()
    new_release(env, hub, watcher, "v2")
    await log.until(seq, "verifying", EMBED)
    agent.kill()
    assert journal_state(env) == "verifying"
    assert await restarted_serving_a_verified_version(agent, env) == before
    message = await log.until(seq, "active", EMBED, timeout_s=120)
    assert message["version"] == "v2" and await agent.serving() == "v2"


async def test_killed_during_activation_twice_falls_back_and_gives_the_version_up(agent, env, hub, watcher) -> None:
    log = UpdateLog(watcher)
    seq = log.last_seq()
    before = await agent.serving()
    new_release(env, hub, watcher, "a3")
    for attempt in (1, 2):
        await log.until(log.last_seq() if attempt == 2 else seq, "health-check", EMBED, timeout_s=120)
        agent.kill()  # `current` already names a3; it has not passed its health check
        assert journal_state(env) == "health-check"
        assert os.readlink(env / "state/models" / EMBED / "current") == "a3"
        assert await restarted_serving_a_verified_version(agent, env) == before  # back on the confirmed one
    message = await log.until(seq, {"rolled-back", "active"}, EMBED, timeout_s=120)
    assert message["state"] == "rolled-back" and message["code"] == "interrupted", message
    assert await agent.serving() == before
    assert journal_state(env) is None  # the job ended
    assert ModelStore(env / "state").current(EMBED) == before
