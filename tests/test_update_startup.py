"""Signed updates and the config agree on what serves, at start-up and at a reload.

- An update that lands while the agent starts (the hub has a newer version when the agent
  comes up) waits for the start-up check (each model's first real request): it once swapped a
  version out from under that check, which logged an ERROR for a model that then served fine.
- What serves is ``[[models]]`` plus what the hub's signed desired state lists. Removing a
  model from ``[[models]]`` and reloading (SIGHUP) unloads it, unless the hub lists it (the
  hub wins for its names); a name the hub stops listing, which the config does not list,
  stops serving too.

The agent runs as `edgefleet serve` (what SIGHUP and the start-up check belong to), against
a real hub behind a real HTTP mirror; the demo models are the real ones.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import CHAT, EMBED, RunningAgent, free_port, start_agent
from update_env import GROUP, Mirror, agent_config, create_hub, embedding_state, make_release, publish_release

from agent.cli.demo import build_demo_bundles
from agent.fleet.updates import UPDATES
from runtime.store import ModelStore
from sync.hub.publish import publish
from sync.hub.repository import HubRepository

REPO = Path(__file__).resolve().parent.parent
V1 = "int8-1.0.0"
COPY = "embed-copy"  # the embedding model's bundle under a second name, listed only in [[models]]
pytestmark = pytest.mark.slow


def lay_out_copy(state: Path, name: str = COPY) -> None:
    store = ModelStore(state)
    source = store.version_path(EMBED, V1)
    store.lay_out(name, V1, {path.name: store.add_file(path) for path in source.iterdir()})
    store.activate(name, V1, reason="test")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("startup")
    build_demo_bundles(root / "state" / "models")
    lay_out_copy(root / "state")
    hub = create_hub(root / "hub", root / "state", (EMBED,))
    release = make_release(root / "state/models" / EMBED / V1, root / "release-2", "2", onnx_note="release 2")
    publish_release(hub, EMBED, release)  # waiting for the agent when it starts
    return root


@pytest.fixture(scope="module")
async def mirror(env: Path) -> AsyncIterator[Mirror]:
    async with Mirror(env / "hub/repository") as mirror:
        yield mirror


class Agent:
    """`edgefleet serve --config agent.toml`, its log, and a way to change its model list."""

    def __init__(self, env: Path, mirror: Mirror) -> None:
        self.env, self.mirror = env, mirror
        self.port = free_port()
        self.grpc_port = free_port()
        self.config = env / "agent.toml"
        self.log = env / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, models: tuple[str, ...]) -> None:
        entries = "".join(f'[[models]]\nname = "{name}"\n' for name in models)
        self.config.write_text(f"""state_dir = "{self.env / "state"}"
[server]
port = {self.port}
grpc_port = {self.grpc_port}
{entries}[mqtt]
device_id = "dev-1"
group = "{GROUP}"
[updates]
hub_url = "{self.mirror.url}"
trust_root = "{self.env / "hub/trust-root.json"}"
health_checks = 2
health_check_interval_s = 0.2
min_free_mb = 0
""")

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "agent", "serve", "--config", str(self.config)],
                                         cwd=REPO, stdout=out, stderr=out)

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    async def wait_for(self, text: str, after: int = 0, timeout_s: float = 180) -> int:
        """Index of the first log line from `after` on that contains `text`."""
        for _ in range(int(timeout_s * 10)):
            assert self.proc is not None and self.proc.poll() is None, "\n".join(self.lines()[-40:])
            for i, line in enumerate(self.lines()[after:], after):
                if text in line:
                    return i
            await asyncio.sleep(0.1)
        raise AssertionError(f"no {text!r} in the log: " + "\n".join(self.lines()[-40:]))

    async def get(self, path: str) -> tuple[int, object]:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{self.port}{path}") as resp:
            return resp.status, await resp.json(content_type=None)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def agent(env: Path, mirror: Mirror) -> Iterator[Agent]:
    agent = Agent(env, mirror)
    agent.write_config((CHAT, EMBED, COPY))
    agent.start()
    yield agent
    agent.stop()


async def test_an_update_landing_during_start_up_logs_no_error(agent: Agent) -> None:
    active = await agent.wait_for("-> active")
    ready = await agent.wait_for("msg=ready")
    lines = agent.lines()
    errors = [line for line in lines if "level=error" in line]
    assert not errors, errors
    queued = next(i for i, line in enumerate(lines) if "-> queued" in line)
    assert ready < queued < active  # the update waited for the start-up check
    status, meta = await agent.get(f"/v2/models/{EMBED}")
    assert status == 200 and meta["versions"] == ["2"], meta  # type: ignore[index]


async def test_a_model_removed_from_the_config_unloads_at_reload_unless_the_hub_lists_it(agent: Agent) -> None:
    await agent.wait_for("msg=ready")
    assert (await agent.get(f"/v2/models/{COPY}"))[0] == 200
    after = len(agent.lines())
    agent.write_config((CHAT,))  # the operator removes both embedding entries
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    await agent.wait_for("configuration reloaded", after)
    status, body = await agent.get(f"/v2/models/{COPY}")
    assert status == 404, body  # [[models]] was the only reason it served
    status, meta = await agent.get(f"/v2/models/{EMBED}")
    assert status == 200 and meta["versions"] == ["2"], meta  # type: ignore[index]  # the hub lists it
    said = "\n".join(agent.lines()[after:])
    assert f"model {EMBED} serves: the hub's signed desired state lists it" in said, said
    assert "level=error" not in said, said


# ---- the hub's side: a name it stops listing stops serving, one it lists anew serves ---------------------


@pytest.fixture
async def hub_agent(tmp_path: Path) -> AsyncIterator[tuple[RunningAgent, HubRepository]]:
    root = embedding_state(tmp_path)
    lay_out_copy(root / "state")
    hub = create_hub(root / "hub", root / "state", (EMBED, COPY))
    async with Mirror(hub.dir / "repository") as mirror:
        config = agent_config(root / "state", mirror.url, hub.dir / "trust-root.json", None, (EMBED,))
        async with start_agent(config) as running:
            await asyncio.wait_for(running.app[UPDATES].reconciled.wait(), 30)
            yield running, hub


async def test_the_hub_listing_a_stored_model_serves_it_and_dropping_it_unloads_it(hub_agent) -> None:
    agent, hub = hub_agent
    status, meta = await agent.get(f"/v2/models/{COPY}")
    assert status == 200 and meta["versions"] == [V1], meta  # the hub lists it; [[models]] does not
    publish(hub, "group", GROUP, remove=[COPY])
    outcome = await agent.app[UPDATES].check_now()
    assert outcome["models"] == {EMBED: "up-to-date", COPY: "unloaded"}, outcome
    assert (await agent.get(f"/v2/models/{COPY}"))[0] == 404
    status, meta = await agent.get(f"/v2/models/{EMBED}")
    assert status == 200 and meta["versions"] == [V1], meta  # listed in [[models]]: it stays
