"""The registry switches versions atomically and keeps serving through a failed load."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import pytest
from conftest import CHAT, EMBED

from agent.context import MODELS
from runtime.backend import GenerationRequest
from runtime.bundle import read_bundle
from runtime.devices import MachineSettings, describe_cpu
from runtime.errors import ShuttingDownError
from runtime.registry import ModelRegistry


def second_version(state_dir: Path, tmp_path: Path, version: str, name: str = EMBED) -> Path:
    source = (state_dir / "models" / name / "current").resolve()
    target = tmp_path / f"{name}-{version}"
    shutil.copytree(source, target)
    toml = target / "model.toml"
    toml.write_text(toml.read_text().replace(f'version = "{read_bundle(source).version}"', f'version = "{version}"'))
    return target


async def test_swap_under_load_drops_no_request(make_agent, state_dir, tmp_path):
    async with make_agent(models=(EMBED,), max_pending=64) as agent:
        registry = agent.app[MODELS]
        old_version = registry.get(EMBED).version
        new_bundle = read_bundle(second_version(state_dir, tmp_path, "2"), name=EMBED)
        seen: list[int] = []
        swapped = asyncio.Event()

        async def client():
            # keeps asking until the swap is over, then a few more times
            after = 0
            while after < 5:
                status, body, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": ["swap me"] * 4})
                seen.append(status)
                assert status == 200, body
                after += swapped.is_set()

        clients = [asyncio.create_task(client()) for _ in range(4)]
        while len(seen) < 8:
            await asyncio.sleep(0.01)
        answered_before_swap = len(seen)
        await registry.load(new_bundle)
        during_swap = len(seen) - answered_before_swap
        swapped.set()
        await asyncio.gather(*clients)
        assert during_swap > 0, "no request was answered while the new version loaded"
        assert len(seen) >= answered_before_swap + during_swap + 20
        assert set(seen) == {200}
        assert registry.get(EMBED).version == "2" != old_version
        status, meta = await agent.get(f"/v2/models/{EMBED}")
        assert status == 200
        assert meta["versions"] == ["2"]


async def test_failed_load_keeps_the_old_version_serving(make_agent, state_dir, tmp_path):
    async with make_agent(models=(EMBED,)) as agent:
        registry = agent.app[MODELS]
        broken = second_version(state_dir, tmp_path, "3")
        (broken / "model.onnx").unlink()
        (broken / "model.onnx").write_bytes(b"not an onnx file")
        try:
            await registry.load(read_bundle(broken, name=EMBED))
        except Exception as exc:  # noqa: BLE001 - the type is checked below
            assert "could not load" in str(exc)
        else:
            raise AssertionError("a corrupt model loaded")
        assert registry.get(EMBED).version != "3"
        status, _, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": "still here"})
        assert status == 200


async def test_unload_and_reload_through_the_repository_api(make_agent):
    async with make_agent(models=(EMBED,)) as agent:
        assert (await agent.post(f"/v2/repository/models/{EMBED}/unload"))[0] == 200
        status, body, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": "x"})
        assert status == 404 and body["error"]["code"] == "model_not_found", body
        assert (await agent.post(f"/v2/repository/models/{EMBED}/load"))[0] == 200
        status, _, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": "x"})
        assert status == 200
        status, index, _ = await agent.post("/v2/repository/index")
        assert index == [{"name": EMBED, "version": "int8-1.0.0", "state": "ready", "reason": ""}]


async def test_a_missing_bundle_is_reported_not_ready_while_others_serve(make_agent):
    async with make_agent(models=(EMBED, "ghost")) as agent:
        status, body = await agent.get("/readyz")
        assert status == 503
        ghost = next(m for m in body["models"] if m["name"] == "ghost")
        assert ghost["state"] == "failed" and "not a model bundle" in ghost["reason"]
        assert (await agent.get("/healthz"))[0] == 200
        status, body, headers = await agent.post("/v1/completions", json={"model": "ghost", "prompt": "x"})
        assert status == 503 and body["error"]["code"] == "model_not_ready" and headers["Retry-After"]
        assert (await agent.post("/v1/embeddings", json={"model": EMBED, "input": "x"}))[0] == 200


async def test_shutdown_unloads_a_staged_version_and_one_still_opening(state_dir, tmp_path, caplog):
    """SIGTERM during an update: the version staged beside the serving one, and one whose load
    was interrupted, are unloaded like the serving one before the process exits (a llama.cpp
    model left to the interpreter's exit crashed the agent with SIGSEGV)."""
    registry = ModelRegistry(MachineSettings(cpu=describe_cpu()))
    chat = (state_dir / "models" / CHAT / "current").resolve()
    await registry.load(read_bundle(chat, name=CHAT))
    staged = await registry.stage(read_bundle(second_version(state_dir, tmp_path, "2", CHAT), name=CHAT))
    opening = asyncio.create_task(registry.stage(read_bundle(second_version(state_dir, tmp_path, "3", CHAT),
                                                             name=CHAT)))
    await asyncio.sleep(0.05)  # its load is under way in a thread
    opening.cancel()
    caplog.set_level(logging.INFO, logger="runtime")
    await registry.close()
    unloaded = {r.getMessage() for r in caplog.records if r.getMessage().endswith(" unloaded")}
    old = read_bundle(chat).version
    assert unloaded == {f"model {CHAT} version {v} unloaded" for v in (old, "2", "3")}
    with pytest.raises(ShuttingDownError):
        staged.generate(GenerationRequest(prompt="still there?", max_tokens=1))
