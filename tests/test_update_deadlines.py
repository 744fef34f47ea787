"""A mirror that trickles the hub's metadata (a byte a second: every read arrives well inside
the read timeout) must not hold the update loop, nor the agent's exit.

Every look at the hub has one overall deadline (`updates.refresh_timeout_s`): past it the
agent answers `hub-unreachable`; and shutdown never waits on the thread python-tuf's
synchronous client runs in. The mirror, the hub, the broker and the agent are real; only
the network's pace is arranged (tests/update_env.py's `Mirror`).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import EMBED, RunningAgent, free_port, start_agent
from mqtt_broker import MosquittoBroker, Watcher, running_broker
from update_env import CMD_TOPIC, Mirror, agent_config, create_hub, embedding_state

from agent.fleet.updates import UPDATES
from sync.hub.repository import HubRepository

REPO = Path(__file__).resolve().parent.parent
TIMESTAMP = "metadata/timestamp.json"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return embedding_state(tmp_path_factory.mktemp("deadlines"))


@pytest.fixture(scope="module")
def hub(env: Path) -> HubRepository:
    return create_hub(env / "hub", env / "state", (EMBED,))


@pytest.fixture(scope="module")
def broker(env: Path) -> Iterator[MosquittoBroker]:
    with running_broker(env) as broker:
        yield broker


@pytest.fixture
async def mirror(hub: HubRepository) -> AsyncIterator[Mirror]:
    async with Mirror(hub.dir / "repository") as mirror:
        yield mirror


class Trickle:
    """timestamp.json from `mirror`, a byte a second from now on."""

    def __init__(self, mirror: Mirror) -> None:
        self.mirror = mirror
        self.requests = len(mirror.ranges.get(TIMESTAMP, []))
        self.sent = mirror.sent.get(TIMESTAMP, 0)
        mirror.on("timestamp.json", throttle_bps=1)

    def requested(self, count: int = 1) -> bool:
        return len(self.mirror.ranges.get(TIMESTAMP, [])) - self.requests >= count

    def unfinished(self) -> bool:
        """Sending, and not one whole copy of the file sent since the trickle began."""
        sent = self.mirror.sent.get(TIMESTAMP, 0) - self.sent
        return 0 < sent < (self.mirror.root / TIMESTAMP).stat().st_size


async def test_sigterm_while_metadata_trickles_exits_at_once(env: Path, hub: HubRepository, mirror: Mirror) -> None:
    """The agent is stopped as systemd stops it while its first look at the hub is stuck in a
    trickle: it must exit, not wait (under systemd: until SIGKILL) for the mirror."""
    trickle = Trickle(mirror)
    port = free_port()
    config = env / "trickle.toml"
    config.write_text(f"""
state_dir = "{env / "state"}"
[server]
port = {port}
grpc_port = {free_port()}
[[models]]
name = "{EMBED}"
[mqtt]
device_id = "dev-1"
group = "lab"
[updates]
hub_url = "{mirror.url}"
trust_root = "{hub.dir / "trust-root.json"}"
read_timeout_s = 5
refresh_timeout_s = 600
min_free_mb = 0
""")
    log = env / "trickle.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "serve", "--config", str(config)], cwd=REPO,
                                stdout=out, stderr=out)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(600):
                assert proc.poll() is None, log.read_text()[-3000:]
                if trickle.requested() and trickle.unfinished():
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"the agent never asked for timestamp.json: {log.read_text()[-3000:]}")
            async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                assert resp.status == 200, await resp.text()  # serving meanwhile
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        while proc.poll() is None and time.monotonic() - started < 30:
            await asyncio.sleep(0.1)  # the mirror keeps trickling on this loop meanwhile
        assert proc.poll() == 0, f"still running {time.monotonic() - started:.0f}s after SIGTERM: " + (
            log.read_text()[-2000:])
        assert trickle.unfinished()  # it did not end because the mirror finished
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
async def agent(env: Path, hub: HubRepository, mirror: Mirror, broker: MosquittoBroker) -> AsyncIterator[RunningAgent]:
    config = agent_config(env / "state", mirror.url, hub.dir / "trust-root.json", broker, (EMBED,),
                          read_timeout_s=2.0, refresh_timeout_s=3.0)
    async with start_agent(config) as running:
        await asyncio.wait_for(running.app[UPDATES].reconciled.wait(), 30)
        yield running


async def test_trickled_metadata_is_hub_unreachable_at_the_deadline_and_stop_does_not_wait(
    agent: RunningAgent, mirror: Mirror, broker: MosquittoBroker
) -> None:
    trickle = Trickle(mirror)
    with Watcher(broker, "test/replies/#") as watcher:
        started = time.monotonic()
        watcher.publish(CMD_TOPIC, json.dumps({"command": "check-now"}), response_topic="test/replies/t")
        (reply,) = await watcher.wait("test/replies/t", timeout_s=60)
    answer = json.loads(reply.payload)
    assert answer["ok"] is True and answer["outcome"] == "hub-unreachable", answer
    assert "timestamp.json" in answer["message"] and "refresh_timeout_s" in answer["message"], answer
    assert time.monotonic() - started < 30  # 3 s of deadline; generous for a loaded machine
    status, body, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": "still served"})
    assert status == 200, body
    service = agent.app[UPDATES]
    service.trigger("doorbell")  # the loop goes to look again, into the trickle
    for _ in range(100):
        if trickle.requested(2):
            break
        await asyncio.sleep(0.05)
    await asyncio.wait_for(service.stop(), 10)  # returns while the mirror still trickles
    assert trickle.unfinished()
