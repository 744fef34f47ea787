"""What a device answers on its `cmd` topic to a command it cannot act on: a reply that says
what was wrong with it (not JSON, or JSON naming no command it knows), over a real
mosquitto to a running agent with signed updates on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from conftest import EMBED, RunningAgent, start_agent
from mqtt_broker import MosquittoBroker, Watcher, running_broker
from update_env import CMD_TOPIC, agent_config, create_hub, embedding_state

from agent.fleet.updates import UPDATES


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = embedding_state(tmp_path_factory.mktemp("commands"))
    create_hub(root / "hub", root / "state", (EMBED,))  # its trust root; the agent cannot reach the hub
    return root


@pytest.fixture(scope="module")
def broker(env: Path) -> Iterator[MosquittoBroker]:
    with running_broker(env) as broker:
        yield broker


@pytest.fixture(scope="module")
async def agent(env: Path, broker: MosquittoBroker) -> AsyncIterator[RunningAgent]:
    config = agent_config(env / "state", "http://127.0.0.1:9", env / "hub/trust-root.json", broker, (EMBED,))
    async with start_agent(config) as running:
        await asyncio.wait_for(running.app[UPDATES].reconciled.wait(), 30)
        yield running


async def ask(broker: MosquittoBroker, payload: bytes, topic: str) -> dict[str, object]:
    with Watcher(broker, topic) as watcher:
        watcher.publish(CMD_TOPIC, payload, response_topic=topic)
        (reply,) = await watcher.wait(topic, timeout_s=30)
    return json.loads(reply.payload)


async def test_a_command_that_is_not_json_is_answered_as_such(agent: RunningAgent, broker: MosquittoBroker) -> None:
    reply = await ask(broker, b"check-now please", "test/replies/not-json")
    assert reply["ok"] is False
    assert "not JSON" in str(reply["error"]) and '{"command": "check-now"}' in str(reply["error"]), reply
    assert "unknown command" not in str(reply["error"]), reply


async def test_json_naming_no_known_command_is_an_unknown_command(agent: RunningAgent,
                                                                  broker: MosquittoBroker) -> None:
    reply = await ask(broker, json.dumps({"command": "reboot"}).encode(), "test/replies/unknown")
    assert reply["ok"] is False and "unknown command" in str(reply["error"]), reply
