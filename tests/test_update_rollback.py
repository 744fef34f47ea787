"""`edgefleet models rollback`: go to the last version that served well before this one.

A second rollback goes further back, never to the version just rolled back from; when
nothing is left it says so in one line (the CLI) or one sentence (the HTTP error JSON),
as it does for a model the agent does not have. The store's rule is checked on a real
store; the operator's view through the real CLI against a running agent with signed
updates on.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import EMBED, RunningAgent, start_agent
from update_env import agent_config, create_hub, embedding_state, make_release

from agent.fleet.updates import UPDATES
from runtime.errors import StoreError
from runtime.store import ModelStore

REPO = Path(__file__).resolve().parent.parent
V1 = "int8-1.0.0"


def install(store: ModelStore, root: Path, version: str, confirm: bool = True) -> Path:
    """A release of the embedding model laid out, activated and (by default) confirmed, as a
    signed update that passed its health check leaves it."""
    bundle = make_release(store.version_path(EMBED, V1), root / f"release-{version}", version,
                          onnx_note=f"release {version}")
    files = {path.name: store.add_file(path) for path in bundle.iterdir()}
    store.lay_out(EMBED, version, files)
    store.activate(EMBED, version, reason="test")
    if confirm:
        store.confirm(EMBED, version)
    return bundle


def test_a_second_rollback_goes_further_back_not_to_the_version_just_left(tmp_path: Path) -> None:
    store = ModelStore(embedding_state(tmp_path) / "state")
    install(store, tmp_path, "2")
    install(store, tmp_path, "3")
    assert store.roll_back(EMBED, "operator") == "2"
    assert store.roll_back(EMBED, "operator") == V1  # not 3, the version just rolled back from
    with pytest.raises(StoreError, match="no earlier version that served well"):
        store.roll_back(EMBED, "operator")
    assert store.current(EMBED) == V1


def test_after_a_rollback_to_the_first_version_there_is_nothing_further(tmp_path: Path) -> None:
    store = ModelStore(embedding_state(tmp_path) / "state")
    install(store, tmp_path, "2")
    assert store.roll_back(EMBED, "operator") == V1
    with pytest.raises(StoreError) as refused:
        store.roll_back(EMBED, "operator")  # once brought 2 back
    assert str(refused.value).endswith(".")
    assert store.current(EMBED) == V1


def test_denied_and_failed_versions_are_skipped(tmp_path: Path) -> None:
    store = ModelStore(embedding_state(tmp_path) / "state")
    install(store, tmp_path, "2")
    install(store, tmp_path, "3")
    install(store, tmp_path, "4", confirm=False)  # failed its health check: never confirmed...
    assert store.roll_back(EMBED, "health check failed") == "3"  # ...so back to the confirmed one
    assert store.roll_back(EMBED, "operator", skip={"2"}) == V1  # 2 is denied by the caller


def test_a_version_a_newer_activation_replaced_served_well(tmp_path: Path) -> None:
    """An older demo version replaced by the next release's demo (activated, never confirmed
    by a health check) is what a rollback goes back to."""
    store = ModelStore(embedding_state(tmp_path) / "state")
    install(store, tmp_path, "demo-2", confirm=False)
    install(store, tmp_path, "3")
    assert store.roll_back(EMBED, "operator") == "demo-2"


def test_an_unknown_model_is_named_in_a_sentence(tmp_path: Path) -> None:
    store = ModelStore(embedding_state(tmp_path) / "state")
    with pytest.raises(StoreError, match=r"^There is no model named nosuch in the model store\.$"):
        store.roll_back("nosuch", "operator")


# ---- the operator's view: CLI and HTTP against a running agent ----------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = embedding_state(tmp_path_factory.mktemp("rollback"))
    create_hub(root / "hub", root / "state", (EMBED,))  # its trust root; the agent cannot reach it
    store = ModelStore(root / "state")
    for version in ("2", "3"):
        install(store, root, version)
    return root


@pytest.fixture(scope="module")
async def agent(env: Path) -> AsyncIterator[RunningAgent]:
    config = agent_config(env / "state", "http://127.0.0.1:9", env / "hub/trust-root.json", None, (EMBED,))
    async with start_agent(config) as running:
        await asyncio.wait_for(running.app[UPDATES].reconciled.wait(), 30)
        yield running


async def cli(env: Path, agent: RunningAgent, *args: str) -> tuple[int, str, str]:
    config = env / "cli.toml"
    config.write_text(f'state_dir = "{env / "state"}"\n[server]\nport = {agent.url.rsplit(":", 1)[1]}\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", *args, "--config", str(config), cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


async def serving(agent: RunningAgent) -> str:
    status, meta = await agent.get(f"/v2/models/{EMBED}")
    assert status == 200, meta
    return meta["versions"][0]


async def test_models_rollback_twice_goes_back_twice_then_says_why_not(env: Path, agent: RunningAgent) -> None:
    assert await serving(agent) == "3"
    code, out, err = await cli(env, agent, "models", "rollback", EMBED)
    assert code == 0 and "rolled back, serving 2" in out, (out, err)
    code, out, err = await cli(env, agent, "models", "rollback", EMBED)
    assert code == 0 and f"rolled back, serving {V1}" in out, (out, err)  # further back, not to 3
    assert await serving(agent) == V1
    code, out, err = await cli(env, agent, "models", "rollback", EMBED)
    assert code == 1 and out == "", (out, err)
    assert err.count("\n") == 1 and err.startswith(f"edgefleet: cannot roll {EMBED} back: "), err
    assert "no earlier version that served well" in err and "{" not in err, err
    assert await serving(agent) == V1


async def test_an_unknown_model_gets_a_sentence_not_a_dict(env: Path, agent: RunningAgent) -> None:
    status, body, _ = await agent.post("/v2/repository/models/nosuch/rollback")
    assert status == 404, body
    assert body == {"error": "There is no model named nosuch in this agent's model store, so there is "
                             "nothing to roll back."}
    code, _, err = await cli(env, agent, "models", "rollback", "nosuch")
    assert code == 1 and err.count("\n") == 1 and "{" not in err, err
    assert err == ("edgefleet: cannot roll nosuch back: there is no model named nosuch in this agent's model "
                   "store, so there is nothing to roll back.\n")
