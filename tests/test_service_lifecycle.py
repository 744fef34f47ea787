"""The agent under a service manager: what systemd hears from it, and what clients see
when it is stopped and reloaded. Real `edgefleet serve` processes, real signals."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import CHAT, EMBED, free_port
from service_process import ServiceProcess, write_config

pytestmark = pytest.mark.slow


async def _ready_code(url: str) -> int:
    async with aiohttp.ClientSession() as http:
        try:
            async with http.get(url + "/readyz") as resp:
                return resp.status
        except aiohttp.ClientError:
            return 0


async def test_systemd_hears_ready_only_after_models_answer_then_watchdog_status_and_stopping(
        tmp_path: Path, state_dir: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_config(tmp_path / "agent.toml", state_dir, port, [CHAT, EMBED])
    agent = ServiceProcess(config, tmp_path, watchdog_usec=400_000)  # a ping every 0.2 s
    try:
        # READY=1 never comes while the models are not in: whenever it had arrived, /readyz says 200.
        polls = 0
        while True:
            told_ready = bool(agent.notify.with_key("READY", "1"))
            code = await _ready_code(url)
            polls += 1
            assert not told_ready or code == 200, "READY=1 sent before the models were in"
            if told_ready:
                break
            assert agent.proc.poll() is None, agent.log()
            await asyncio.sleep(0.05)
        assert polls > 5  # it was watched while it loaded
        ready = agent.notify.with_key("READY", "1")[0]
        statuses = agent.notify.statuses()
        assert statuses[0] == "starting" and "loading 2 model(s)" in statuses
        # each model answered a real request before READY=1
        for model in (CHAT, EMBED):
            assert f"checking {model} with a real request" in statuses
            assert f"model {model} answers" in agent.log()
        assert ready.fields["STATUS"] == f"serving 2 model(s): {EMBED}, {CHAT}"
        assert await _ready_code(url) == 200

        # WATCHDOG=1 at half of WATCHDOG_USEC, from the event loop, before and after READY
        await asyncio.sleep(2.0)
        pings = [m.at for m in agent.notify.with_key("WATCHDOG", "1")]
        assert pings[0] < ready.at
        recent = [t for t in pings if t > ready.at]
        gaps = [b - a for a, b in itertools.pairwise(recent)]
        assert 8 <= len(recent) <= 14, recent
        assert max(gaps) < 0.4, f"a gap of {max(gaps):.2f}s would have tripped WatchdogSec=0.4s"

        agent.signal(signal.SIGTERM)
        stopping = await agent.notify.wait_for("STOPPING", "1", timeout=10)
        assert stopping.fields["STATUS"].startswith("draining")
        assert await agent.wait_exit(timeout=30) == 0
        log = agent.log()
        assert "Traceback" not in log
        # logfmt lines journald keeps: level, logger, message, key fields
        assert 'level=info logger=edgefleet msg=ready models=2' in log
    finally:
        agent.stop()


async def test_sigterm_under_load_finishes_admitted_requests_and_refuses_new_ones(
        tmp_path: Path, state_dir: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_config(tmp_path / "agent.toml", state_dir, port, [CHAT], drain_timeout_s=40)
    agent = ServiceProcess(config, tmp_path, abstract_socket=True)
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Count from 1 to 300, one number a line."}],
            "max_tokens": 160, "temperature": 0}
    try:
        await agent.notify.wait_for("READY", "1")
        async with aiohttp.ClientSession() as http:
            chunks: list[dict] = []
            first_chunk = asyncio.Event()

            async def streamed() -> tuple[int, bool]:
                async with http.post(url + "/v1/chat/completions", json={**body, "stream": True}) as resp:
                    done = False
                    async for raw in resp.content:
                        line = raw.decode().strip()
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            chunks.append(json.loads(line[6:]))
                            first_chunk.set()
                    return resp.status, done

            async def plain() -> tuple[int, dict]:
                async with http.post(url + "/v1/chat/completions", json={**body, "max_tokens": 48}) as resp:
                    return resp.status, await resp.json()

            stream_task = asyncio.create_task(streamed())
            await asyncio.wait_for(first_chunk.wait(), 60)
            plain_task = asyncio.create_task(plain())  # queued behind the stream on the model's thread
            deadline = time.monotonic() + 10
            while True:  # admitted: the queue holds both
                async with http.get(url + "/metrics") as resp:
                    if f'edgefleet_queue_depth{{model="{CHAT}"}} 2.0' in await resp.text():
                        break
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            assert not stream_task.done()

            signalled = time.monotonic()
            agent.signal(signal.SIGTERM)
            await agent.notify.wait_for("STOPPING", "1", timeout=10)
            async with aiohttp.ClientSession() as fresh, \
                    fresh.post(url + "/v1/chat/completions", json=body) as resp:  # a new client and connection
                refused_status, refused = resp.status, await resp.json()
                retry_after = resp.headers.get("Retry-After")
            stream_status, stream_done = await stream_task
            plain_status, plain_body = await plain_task

        assert refused_status == 503 and retry_after
        assert refused["error"]["code"] == "shutting_down" and refused["error"]["type"] == "unavailable_error"
        assert stream_status == 200 and stream_done, "the stream was cut instead of finishing"
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert plain_status == 200 and plain_body["usage"]["completion_tokens"] > 0
        assert await agent.wait_exit(timeout=40) == 0
        assert time.monotonic() - signalled < 40
        assert "Traceback" not in agent.log()
    finally:
        agent.stop()


async def test_sighup_applies_new_key_and_models_and_refuses_a_broken_config(tmp_path: Path, state_dir: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    path = tmp_path / "agent.toml"
    old_key, new_key = "old-key-123456", "new-key-654321"
    write_config(path, state_dir, port, [CHAT], api_key=old_key)
    agent = ServiceProcess(path, tmp_path)

    async def models(key: str) -> tuple[int, set[str]]:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http, \
                http.get(url + "/v1/models") as resp:
            body = await resp.json()
            return resp.status, {m["id"] for m in body.get("data", [])}

    async def reload(expected_ready: int) -> None:
        agent.signal(signal.SIGHUP)
        await agent.notify.wait_for("RELOADING", "1", count=expected_ready - 1)
        await agent.notify.wait_for("READY", "1", count=expected_ready)

    try:
        await agent.notify.wait_for("READY", "1")
        assert await models(old_key) == (200, {CHAT})
        assert (await models(new_key))[0] == 401

        write_config(path, state_dir, port, [CHAT, EMBED], api_key=new_key,
                     extra='log_level = "debug"\n[limits]\nmax_prompt_chars = 40\nmax_embedding_inputs = 2')
        await reload(expected_ready=2)
        assert await models(new_key) == (200, {CHAT, EMBED})
        assert (await models(old_key))[0] == 401
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {new_key}"}) as http:
            async with http.post(url + "/v1/embeddings", json={"model": EMBED, "input": "hello"}) as resp:
                assert resp.status == 200 and len((await resp.json())["data"][0]["embedding"]) == 384
            # the new limits hold for the model that was serving before the reload, and the new one
            async with http.post(url + "/v1/chat/completions", json={
                    "model": CHAT, "max_tokens": 2, "messages": [{"role": "user", "content": "x" * 41}]}) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["code"] == "prompt_too_large"
            async with http.post(url + "/v1/embeddings", json={"model": EMBED, "input": ["a", "b", "c"]}) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["param"] == "input"

        path.write_text(path.read_text().replace(f"port = {port}", 'port = "eighty"'))
        await reload(expected_ready=3)
        assert await models(new_key) == (200, {CHAT, EMBED})  # the old config keeps serving
        log = agent.log()
        assert "reload refused, the running configuration stays" in log and "server.port: expected an integer" in log

        write_config(path, state_dir, free_port(), [CHAT], api_key=new_key)  # a model removed, a new port
        await reload(expected_ready=4)
        assert await models(new_key) == (200, {CHAT})
        assert "changed but applied only after a restart: server.port" in agent.log()

        agent.signal(signal.SIGTERM)
        assert await agent.wait_exit(timeout=30) == 0
        assert "Traceback" not in agent.log()
    finally:
        agent.stop()


async def test_an_agent_with_no_models_says_how_to_add_one(tmp_path: Path) -> None:
    """A fresh install (a .deb, a container) starts with nothing to serve: the log says what to do."""
    config = write_config(tmp_path / "agent.toml", tmp_path / "state", free_port(), [])
    agent = ServiceProcess(config, tmp_path)
    try:
        await agent.notify.wait_for("READY", "1", timeout=30)
        log = agent.log()
        assert "no models to serve: add [[models]] entries naming bundles under" in log, log
        assert str(tmp_path / "state" / "models") in log and "[updates]" in log
        agent.signal(signal.SIGTERM)
        assert await agent.wait_exit(15) == 0
    finally:
        agent.stop()
