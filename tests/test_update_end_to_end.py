"""Signed updates end to end: `edgefleet hub publish` rings the doorbell on a real mosquitto;
a running agent refreshes through TUF from the real `hub serve` app, downloads, verifies,
stages, probes, activates and serves the new version of a real demo model while four
clients keep asking; `hub status` shows it; an operator rolls back on the device (the cmd topic
refuses to); a version that fails its probe is rolled back on its own; a broker restart does
not lose an update."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from conftest import CHAT, EMBED, Executions, RunningAgent, free_port, start_agent
from mqtt_broker import MosquittoBroker, Watcher
from update_env import (
    CMD_TOPIC,
    DEVICE,
    GROUP_DOORBELL,
    JOB_STEPS,
    UPDATE_TOPIC,
    UpdateLog,
    agent_config,
    create_hub,
    make_release,
    publish_release,
)

from agent.cli.demo import build_demo_bundles
from agent.context import MODELS
from agent.fleet.updates import UPDATES
from runtime.store import ModelStore
from sync.hub.mqtt_tools import Broker, ring_doorbell
from sync.hub.repository import HubRepository
from sync.hub.server import hub_app

REPO = Path(__file__).resolve().parent.parent
EDGEFLEET = [sys.executable, "-m", "agent"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    build_demo_bundles(root / "state" / "models")
    return root


@pytest.fixture(scope="module")
def broker(e2e_dir: Path) -> MosquittoBroker:
    broker = MosquittoBroker(e2e_dir)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def hub(e2e_dir: Path) -> HubRepository:
    return create_hub(e2e_dir / "hub", e2e_dir / "state", (CHAT, EMBED))


@pytest.fixture(scope="module")
async def hub_url(hub: HubRepository) -> AsyncIterator[str]:
    runner = web.AppRunner(hub_app(hub.dir / "repository"))  # what `edgefleet hub serve` runs
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture(scope="module")
async def agent(
    e2e_dir: Path, hub: HubRepository, hub_url: str, broker: MosquittoBroker
) -> AsyncIterator[RunningAgent]:
    config = agent_config(e2e_dir / "state", hub_url, hub.dir / "trust-root.json", broker, (CHAT, EMBED))
    async with start_agent(config) as running:
        await asyncio.wait_for(running.app[UPDATES].reconciled.wait(), 30)
        yield running


@pytest.fixture(scope="module")
def watcher(broker: MosquittoBroker) -> Watcher:
    with Watcher(broker, UPDATE_TOPIC, f"edgefleet/v1/devices/{DEVICE}/state", "test/replies/#") as w:
        yield w


async def cli(*args: str, timeout_s: float = 60.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *EDGEFLEET, *args, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    return proc.returncode or 0, out.decode()


async def served_version(agent: RunningAgent, name: str) -> str:
    if name == CHAT:  # what serves now, as the registry has it (KServe metadata is for tensor models)
        return agent.app[MODELS].get(name).version
    status, meta = await agent.get(f"/v2/models/{name}")
    assert status == 200, meta
    return meta["versions"][0]


async def test_publish_reaches_the_agent_over_mqtt_and_four_clients_see_no_failure(
    agent: RunningAgent, hub: HubRepository, broker: MosquittoBroker, watcher: Watcher, e2e_dir: Path
) -> None:
    log = UpdateLog(watcher)
    seq = log.last_seq()
    old = await served_version(agent, EMBED)
    release = make_release(
        e2e_dir / "state/models" / EMBED / "current", e2e_dir / "emb-2", "2", onnx_note="edgefleet release 2"
    )
    statuses: list[int] = []
    done = asyncio.Event()

    async def client() -> None:
        after = 0
        while after < 5:  # steadily, through the swap and a little beyond
            status, body, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": ["a steady client"]})
            statuses.append(status)
            assert status == 200, body
            after += done.is_set()

    clients = [asyncio.create_task(client()) for _ in range(4)]
    code, out = await cli(
        "hub",
        "publish",
        "--hub",
        str(hub.dir),
        "--group",
        "lab",
        f"{EMBED}={release}",
        "--mqtt",
        f"{broker.host}:{broker.port}",
    )
    assert code == 0, out
    assert "doorbell rung on edgefleet/v1/groups/lab/desired" in out
    active = await log.until(seq, "active", EMBED)
    done.set()
    await asyncio.gather(*clients)

    assert len(statuses) > 20 and set(statuses) == {200}
    arrived = [m["state"] for m in log.since(seq) if m["job"] == active["job"]]
    assert arrived == JOB_STEPS  # in order, each once, as an operator's subscriber received them
    assert log.steps(seq, active["job"]) == JOB_STEPS
    assert active["version"] == "2" and active["from_version"] == old and active["serving"][EMBED] == "2"
    assert await served_version(agent, EMBED) == "2"
    store = ModelStore(e2e_dir / "state")
    assert store.current(EMBED) == "2" and store.record(EMBED).confirmed == "2"
    assert store.verify_version(EMBED, "2")
    assert not list(store.staging.iterdir())  # nothing left half-downloaded
    # the operator's view, from MQTT alone
    code, out = await cli("hub", "status", "--mqtt", f"{broker.host}:{broker.port}", "--json")
    assert code == 0, out
    (row,) = [r for r in json.loads(out) if r["device"] == DEVICE]
    assert row["online"] is True and row["group"] == "lab"
    assert row["models"][EMBED] == "2"
    assert row["update"]["state"] == "active" and row["update"]["version"] == "2"
    code, out = await cli("hub", "status", "--mqtt", f"{broker.host}:{broker.port}")
    assert DEVICE in out and f"{EMBED}=2" in out and "active" in out


async def test_operator_rollback_from_the_cli_sticks_until_a_newer_desired_state(
    agent: RunningAgent, watcher: Watcher, e2e_dir: Path
) -> None:
    log = UpdateLog(watcher)
    seq = log.last_seq()
    config = e2e_dir / "agent.toml"
    config.write_text(f'state_dir = "{e2e_dir / "state"}"\n[server]\nport = {agent.url.rsplit(":", 1)[1]}\n')
    code, out = await cli("models", "rollback", EMBED, "--config", str(config))
    assert code == 0, out
    assert "rolled back, serving int8-1.0.0" in out
    message = await log.until(seq, "rolled-back", EMBED)
    assert message["code"] == "operator" and message["from_version"] == "2"
    assert await served_version(agent, EMBED) == "int8-1.0.0"
    status, body, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": "still answers"})
    assert status == 200, body
    # the same through the cmd topic: check-now finds version 2 denied, so nothing is reinstalled
    watcher.publish(
        CMD_TOPIC, json.dumps({"command": "check-now"}), response_topic="test/replies/1", correlation_data=b"c1"
    )
    (reply,) = await watcher.wait("test/replies/1")
    answer = json.loads(reply.payload)
    assert reply.correlation_data == b"c1"
    assert answer["ok"] is True and answer["models"][EMBED] == "denied", answer
    assert await served_version(agent, EMBED) == "int8-1.0.0"
    # a rollback on the cmd topic is refused (MQTT is not signed): the answer says what to use
    watcher.publish(CMD_TOPIC, json.dumps({"command": "rollback", "model": EMBED}), response_topic="test/replies/2")
    (reply,) = await watcher.wait("test/replies/2")
    answer = json.loads(reply.payload)
    assert answer["ok"] is False and "hub publish --pin" in answer["error"], answer
    assert await served_version(agent, EMBED) == "int8-1.0.0"
    # and the CLI, with nothing earlier left to go back to, says why in one line
    code, out = await cli("models", "rollback", CHAT, "--config", str(config))
    assert code == 1 and out.count("\n") == 1 and "no earlier version that served well" in out, out
    assert (
        await agent.post(
            "/v1/chat/completions",
            json={"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
    )[0] == 200


async def test_a_version_that_loads_but_fails_its_probe_is_rolled_back_on_its_own(
    agent: RunningAgent, hub: HubRepository, broker: MosquittoBroker, watcher: Watcher, e2e_dir: Path
) -> None:
    log = UpdateLog(watcher)
    seq = log.last_seq()
    old = await served_version(agent, CHAT)
    # a release whose chat template fails at the first chat: the weights load fine
    broken = make_release(
        e2e_dir / "state/models" / CHAT / "current",
        e2e_dir / "chat-bad",
        "bad-template",
        toml=lambda t: t.replace("[gguf]", "[gguf]\nchat_template = \"{{ raise_exception('broken template') }}\""),
    )
    result = publish_release(hub, CHAT, broken)
    ring_doorbell(Broker(broker.host, broker.port), GROUP_DOORBELL, result.doorbell)
    message = await log.until(seq, {"rolled-back", "active", "failed"}, CHAT)
    assert message["state"] == "rolled-back", message
    assert message["code"] == "health-check" and "probe" in message["message"]
    assert log.steps(seq, message["job"]) == [
        "queued",
        "downloading",
        "verifying",
        "staged",
        "activating",
        "rolled-back",
    ]
    assert await served_version(agent, CHAT) == old
    status, body, _ = await agent.post(
        "/v1/chat/completions",
        json={"model": CHAT, "messages": [{"role": "user", "content": "Still there?"}], "max_tokens": 4},
    )
    assert status == 200, body
    assert ModelStore(e2e_dir / "state").current(CHAT) == old
    # not retried while the desired state stays the same
    seq = log.last_seq()
    reply = await agent.app[UPDATES].check_now()
    assert reply["models"][CHAT] == "denied"
    assert not [m for m in log.since(seq) if m["model"] == CHAT]


async def test_an_update_announced_while_the_broker_was_down_arrives_after_it_returns(
    agent: RunningAgent, hub: HubRepository, broker: MosquittoBroker, watcher: Watcher, e2e_dir: Path
) -> None:
    log = UpdateLog(watcher)
    seq = log.last_seq()
    release = make_release(
        e2e_dir / "state/models" / EMBED / "int8-1.0.0", e2e_dir / "emb-3", "3", onnx_note="edgefleet release 3"
    )
    broker.stop()  # restarts empty: no session, no retained doorbell
    publish_release(hub, EMBED, release)  # the doorbell cannot ring now
    await asyncio.sleep(0.5)
    broker.start()
    message = await log.until(seq, "active", EMBED, timeout_s=90)
    assert message["version"] == "3"
    assert await served_version(agent, EMBED) == "3"
    state = json.loads(watcher.wait_for(f"edgefleet/v1/devices/{DEVICE}/state")[-1].payload)
    assert state["online"] is True


async def test_reports_wait_for_the_broker_and_never_hold_an_update(
    agent: RunningAgent, hub: HubRepository, broker: MosquittoBroker, watcher: Watcher, e2e_dir: Path
) -> None:
    release = make_release(e2e_dir / "emb-3", e2e_dir / "emb-4", "4", onnx_note="edgefleet release 4")
    publish_release(hub, EMBED, release)
    broker.stop()
    service = agent.app[UPDATES]
    outcome = await service.check_now()  # the hub is reachable; the broker is not
    assert outcome["models"][EMBED] == "active"
    assert await served_version(agent, EMBED) == "4"
    assert service.reporter.pending >= len(JOB_STEPS)  # waiting, not lost, not blocking
    sent = service.reporter.sent
    broker.start()  # empty: the watcher's session and the retained messages are gone
    async with asyncio.timeout(60):
        while service.reporter.pending:
            await asyncio.sleep(0.05)
    assert service.reporter.sent >= sent + len(JOB_STEPS)
    with Watcher(broker, UPDATE_TOPIC) as late:  # what an operator who looks now sees
        last = json.loads((await late.wait(UPDATE_TOPIC))[-1].payload)
    assert (last["model"], last["version"], last["state"]) == (EMBED, "4", "active")


async def test_models_fetch_downloads_and_verifies_with_a_progress_bar_without_activating(
    agent: RunningAgent, hub: HubRepository, hub_url: str, e2e_dir: Path
) -> None:
    release = make_release(e2e_dir / "emb-3", e2e_dir / "emb-5", "5", onnx_note="edgefleet release 5")
    publish_release(hub, EMBED, release)  # no doorbell: the agent does not know yet
    config = e2e_dir / "fetch.toml"
    config.write_text(
        f'state_dir = "{e2e_dir / "state"}"\n[mqtt]\ndevice_id = "{DEVICE}"\ngroup = "lab"\n'
        f'[updates]\nhub_url = "{hub_url}"\ntrust_root = "{hub.dir / "trust-root.json"}"\n'
    )
    code, out = await cli("models", "fetch", "--config", str(config))
    assert code == 0, out
    assert f"{EMBED}=5" in out and "2 file(s) verified" in out  # model.onnx and model.toml; the tokenizer is unchanged
    assert "100%" in out  # tqdm's bar for the model file
    onnx = hub.targets().targets[f"models/{EMBED}/5/model.onnx"].hashes["sha256"]
    store = ModelStore(e2e_dir / "state")
    assert store.verify_blob(onnx) and store.current(EMBED) == "4"  # fetched, verified, not activated
    assert await served_version(agent, EMBED) == "4"
    outcome = await agent.app[UPDATES].check_now()  # the agent then finds the file already there
    assert outcome["models"][EMBED] == "active"
    assert onnx not in agent.app[UPDATES].download_stats  # nothing downloaded again
    assert await served_version(agent, EMBED) == "5"


async def test_a_chat_model_installed_by_an_update_decodes_eight_chats_together(
    agent: RunningAgent, hub: HubRepository, broker: MosquittoBroker, watcher: Watcher, e2e_dir: Path
) -> None:
    """A version that arrives through the signed path is opened as one loaded at start is:
    with continuous batching (it once got a one-at-a-time queue until the next restart)."""
    log = UpdateLog(watcher)
    seq = log.last_seq()
    release = make_release(e2e_dir / "state/models" / CHAT / "current", e2e_dir / "chat-2", "chat-2")
    result = publish_release(hub, CHAT, release)
    ring_doorbell(Broker(broker.host, broker.port), GROUP_DOORBELL, result.doorbell)
    message = await log.until(seq, {"active", "failed", "rolled-back"}, CHAT, timeout_s=120)
    assert message["state"] == "active", message
    assert await served_version(agent, CHAT) == "chat-2"
    # sampled without a seed: such rows share decode calls whatever the CPU's kernels
    body = {"model": CHAT, "max_tokens": 24, "temperature": 0.8,
            "logit_bias": {"0": -100, "2": -100, "4": -100}}  # no end of text: every chat runs 24 tokens

    async def chat(i: int) -> None:
        status, reply, _ = await agent.post("/v1/chat/completions", json={
            **body, "messages": [{"role": "user", "content": f"Tell me about device {i}."}]})
        assert status == 200, reply

    async with Executions(agent, CHAT) as decodes:
        await asyncio.gather(*(chat(i) for i in range(8)))
    assert decodes.executed / decodes.executions > 3, (
        f"{decodes.executed:.0f} requests served in {decodes.executions:.0f} scheduler runs: "
        "the updated version does not batch")


def test_hub_keys_are_owner_only(hub: HubRepository) -> None:
    assert os.stat(hub.keys.directory).st_mode & 0o777 == 0o700
    keys = list(hub.keys.directory.iterdir())
    assert len(keys) == 6  # 2 root, 2 targets, snapshot, timestamp
    assert all(os.stat(k).st_mode & 0o777 == 0o600 for k in keys)
