"""Scoped API keys end to end: `edgefleet keys` makes them, a real `edgefleet serve` checks them,
and unmodified clients use them: the `openai` client, tritonclient over HTTP and gRPC.

The agent runs as its own process (tritonclient's protobuf messages cannot share a process
with the agent's), with a keys file made by the CLI and the config's single api_key beside
it. A SIGHUP test runs the service as systemd would, with a config file and notify socket.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from agent_process import AgentProcess, serve
from conftest import CHAT, EMBED, free_port
from rawhttp import exchange
from service_process import ServiceProcess, write_config

from security.keys_file import read_keys_file, write_keys_file

CONFIG_KEY = "config-key-0123456789"
OUTPUT = "last_hidden_state"
IDS = np.array([[101, 7592, 2088, 999, 102]], dtype=np.int64)
FEEDS = {"input_ids": IDS, "attention_mask": np.ones_like(IDS), "token_type_ids": np.zeros_like(IDS)}


def edgefleet(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as an operator runs it."""
    env = {**os.environ, "EDGEFLEET_CONFIG": ""}
    return subprocess.run([sys.executable, "-m", "agent", *args], check=False, capture_output=True, text=True,
                          env=env, timeout=120)


class Reply:
    """An HTTP answer, read whole."""

    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status_code, self.headers, self.text = status, headers, body.decode()

    def json(self) -> Any:
        return json.loads(self.text)


def call(method: str, url: str, headers: dict[str, str] | None = None, json_body: Any = None) -> Reply:
    data = json.dumps(json_body).encode() if json_body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={
        **(headers or {}), **({"Content-Type": "application/json"} if data else {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, error.headers, error.read())


def add_key(state: Path, name: str, *options: str) -> str:
    done = edgefleet("keys", "add", name, *options, "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    (secret,) = done.stdout.split()  # the secret is the only thing on stdout
    return secret


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    state = tmp_path_factory.mktemp("keys")
    secrets = {
        "chat-app": add_key(state, "chat-app", "--scope", "infer", "--model", CHAT),
        "tensors-app": add_key(state, "tensors-app", "--scope", "tensors,embeddings"),
        "ops": add_key(state, "ops", "--scope", "metrics", "--scope", "admin"),
        "limited": add_key(state, "limited", "--scope", "tensors", "--rpm", "2"),
        "revoked": add_key(state, "revoked", "--scope", "infer"),
        "expired": add_key(state, "expired", "--scope", "infer"),
    }
    assert edgefleet("keys", "revoke", "revoked", "--state-dir", str(state)).returncode == 0
    path = state / "api-keys.json"
    document = read_keys_file(path)
    assert document is not None
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    write_keys_file(path, dataclasses.replace(document, keys=[
        dataclasses.replace(k, expires=past) if k.name == "expired" else k for k in document.keys]))
    secrets["path"] = str(path)
    return secrets


@pytest.fixture(scope="module")
def agent(state_dir: Path, keys: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    with serve(state_dir, tmp_path_factory.mktemp("keys-agent"), server__api_keys_file=keys["path"],
               server__api_key=CONFIG_KEY, server__auth_failures_per_minute=10_000) as running:
        yield running


def oai(agent: AgentProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=agent.url + "/v1", api_key=key, max_retries=0)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def triton_inputs(module, feeds):  # type: ignore[no-untyped-def]
    inputs = []
    for name, array in feeds.items():
        tensor = module.InferInput(name, list(array.shape), module.np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def test_the_cli_prints_a_secret_once_and_never_lists_it(keys: dict[str, str]) -> None:
    state = Path(keys["path"]).parent
    listing = edgefleet("keys", "list", "--state-dir", str(state))
    assert listing.returncode == 0, listing.stderr
    for name, secret in keys.items():
        if name != "path":
            assert secret not in listing.stdout and secret not in Path(keys["path"]).read_text()
    assert "revoked" in listing.stdout.split("\n", 2)[2] and "expired" in listing.stdout
    rows = {r["name"]: r for r in json.loads(edgefleet("keys", "list", "--json", "--state-dir", str(state)).stdout)}
    assert rows["chat-app"]["scopes"] == ["infer"] and rows["chat-app"]["models"] == [CHAT]
    assert rows["limited"]["limits"] == {"requests_per_minute": 2}
    assert rows["revoked"]["state"] == "revoked" and rows["expired"]["state"] == "expired"
    assert oct(Path(keys["path"]).stat().st_mode & 0o777) == "0o600"
    for bad, message in ((["add", "x", "--scope", "everything"], "not a scope"), (["add", "x"], "--scope"),
                         (["add", "chat-app", "--scope", "infer"], "exists"), (["revoke", "nobody"], "no key named"),
                         (["add", "x", "--scope", "infer", "--expires", "yesterday"], "--expires"),
                         (["add", "bad name", "--scope", "infer"], "name")):
        done = edgefleet("keys", *bad, "--state-dir", str(state))
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1


def test_a_scoped_key_works_with_the_openai_client_within_its_scope_and_models(agent, keys) -> None:
    client = oai(agent, keys["chat-app"])
    reply = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert reply.choices[0].message.content is not None and reply.usage is not None
    assert [m.id for m in client.models.list().data] == [CHAT]  # it sees only its models
    with pytest.raises(openai.PermissionDeniedError) as no_scope:
        client.embeddings.create(model=EMBED, input="x")
    assert no_scope.value.code == "insufficient_scope" and "'embeddings'" in no_scope.value.message
    with pytest.raises(openai.PermissionDeniedError) as no_model:
        client.completions.create(model=EMBED, prompt="Hi", max_tokens=2)
    assert no_model.value.code == "model_not_allowed"
    assert len(oai(agent, keys["tensors-app"]).embeddings.create(model=EMBED, input="x").data) == 1
    # the config's single api_key is a key with every scope
    assert oai(agent, CONFIG_KEY).embeddings.create(model=EMBED, input="x").data
    metrics = call("GET", agent.url + "/metrics", bearer(CONFIG_KEY))
    assert metrics.status_code == 200
    assert call("GET", agent.url + "/metrics", bearer(keys["chat-app"])).status_code == 403


def test_usage_is_counted_by_key_name_and_no_secret_reaches_metrics(agent, keys) -> None:
    oai(agent, keys["chat-app"]).completions.create(model=CHAT, prompt="Hello", max_tokens=3)
    text = call("GET", agent.url + "/metrics", bearer(keys["ops"])).text
    lines = text.splitlines()
    assert any(line.startswith('edgefleet_key_requests_total{key="chat-app",outcome="ok"}') for line in lines)
    assert any(line.startswith('edgefleet_key_requests_total{key="chat-app",outcome="denied"}') for line in lines)
    tokens = {line.split("}")[0]: float(line.rsplit(" ", 1)[1]) for line in lines
              if line.startswith("edgefleet_key_tokens_total{")}
    assert tokens['edgefleet_key_tokens_total{key="chat-app",kind="completion"'] >= 3
    assert tokens['edgefleet_key_tokens_total{key="chat-app",kind="prompt"'] >= 1
    assert tokens['edgefleet_key_tokens_total{key="tensors-app",kind="prompt"'] >= 1
    for name, secret in keys.items():
        if name != "path":
            assert secret not in text and secret.split("_")[1] not in text  # neither the secret nor its id
    assert CONFIG_KEY not in text


def test_tritonclient_over_grpc_and_http_with_a_key(agent, keys) -> None:
    with grpcclient.InferenceServerClient(agent.grpc) as triton:
        result = triton.infer(EMBED, triton_inputs(grpcclient, FEEDS), headers=bearer(keys["tensors-app"]))
        assert result.as_numpy(OUTPUT).shape == (1, 5, 384)
        with pytest.raises(grpcclient.InferenceServerException) as denied:
            triton.infer(EMBED, triton_inputs(grpcclient, FEEDS), headers=bearer(keys["chat-app"]))
        assert denied.value.status() == "StatusCode.PERMISSION_DENIED" and "'tensors'" in denied.value.message()
        assert triton.is_server_live()  # health needs no key
    web = httpclient.InferenceServerClient(agent.url.removeprefix("http://"))
    try:
        result = web.infer(EMBED, triton_inputs(httpclient, FEEDS), headers=bearer(keys["tensors-app"]))
        assert result.as_numpy(OUTPUT).shape == (1, 5, 384)
        with pytest.raises(httpclient.InferenceServerException) as denied:
            web.infer(EMBED, triton_inputs(httpclient, FEEDS), headers=bearer(keys["chat-app"]))
        assert denied.value.status() == "403"
    finally:
        web.close()


BAD_KEYS = {
    "wrong": "efk_0123456789ab_" + "A" * 43,
    "not-ours": "sk-proj-abcdefghijklmnop",
    "empty": "",
    "long": "x" * 7000,
}


def test_bad_keys_get_401_in_each_protocols_own_form(agent, keys) -> None:
    bad = {**BAD_KEYS, "revoked": keys["revoked"], "expired": keys["expired"]}
    for kind, key in bad.items():
        headers = {"Authorization": f"Bearer {key}"} if key else {"Authorization": ""}
        v1 = call("POST", agent.url + "/v1/chat/completions", headers,
                  {"model": CHAT, "messages": [{"role": "user", "content": "x"}]})
        assert v1.status_code == 401, (kind, v1.text)
        assert v1.json()["error"]["code"] == "invalid_api_key" and v1.headers["WWW-Authenticate"] == "Bearer"
        v2 = call("POST", f"{agent.url}/v2/models/{EMBED}/infer", headers, {"inputs": []})
        assert v2.status_code == 401 and isinstance(v2.json()["error"], str), (kind, v2.text)
        with grpcclient.InferenceServerClient(agent.grpc) as triton, \
                pytest.raises(grpcclient.InferenceServerException) as refused:
            triton.infer(EMBED, triton_inputs(grpcclient, FEEDS), headers=bearer(key) if key else None)
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED", (kind, refused.value.message())
    assert "was revoked" in oai_error(agent, keys["revoked"]) and "expired" in oai_error(agent, keys["expired"])


def oai_error(agent: AgentProcess, key: str) -> str:
    with pytest.raises(openai.AuthenticationError) as refused:
        oai(agent, key).models.list()
    return refused.value.message


async def test_latin1_bytes_and_a_10kb_key_are_a_401_not_a_5xx(agent, keys) -> None:
    for value in (b"Bearer \xe9\xff\xfe\x80caf\xe9", b"\xff\xfe", b"Bearer efk_\xe9" + b"a" * 100):
        raw = await exchange(agent.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: " + value
                             + b"\r\nConnection: close\r\n\r\n")
        assert raw is not None and raw.status == 401, raw
        assert raw.json()["error"]["code"] == "invalid_api_key"
    # 10 KB: past server.max_header_bytes (8190 by default) the parser refuses it first, in JSON
    raw = await exchange(agent.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + b"k" * 10_240 + b"\r\nConnection: close\r\n\r\n")
    assert raw is not None and raw.status == 431 and raw.json()["error"]["code"] == "request_header_too_large"
    assert "Traceback" not in agent.log()


def test_a_key_past_its_request_rate_gets_429_in_each_protocol(agent, keys) -> None:
    """limited: 2 requests a minute, on gRPC and HTTP together."""
    with grpcclient.InferenceServerClient(agent.grpc) as triton:
        triton.infer(EMBED, triton_inputs(grpcclient, FEEDS), headers=bearer(keys["limited"]))
        response = call("GET", f"{agent.url}/v2/models/{EMBED}", bearer(keys["limited"]))
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-requests"] == "2"
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(grpcclient.InferenceServerException) as limited:
            triton.infer(EMBED, triton_inputs(grpcclient, FEEDS), headers=bearer(keys["limited"]))
        assert limited.value.status() == "StatusCode.RESOURCE_EXHAUSTED", limited.value.message()
    refused = call("POST", f"{agent.url}/v2/models/{EMBED}/infer", bearer(keys["limited"]), {"inputs": []})
    assert refused.status_code == 429 and "requests per minute" in refused.json()["error"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")


# ---- SIGHUP: keys change under a running service -------------------------------------------

def own_state_config(tmp_path: Path, models_from: Path, port: int, keys_path: Path, *models: str) -> Path:
    """A config with a state dir of its own (the module's agent holds the shared one's lock),
    serving the shared demo bundles by path."""
    config = write_config(tmp_path / "agent.toml", tmp_path / "state", port, list(models))
    text = config.read_text().replace("[server]\n", f'[server]\napi_keys_file = "{keys_path}"\n')
    for name in models:
        bundle = models_from / "models" / name / "current"
        text = text.replace(f'name = "{name}"\n', f'name = "{name}"\npath = "{bundle}"\n')
    config.write_text(text)
    return config


async def ready(service: ServiceProcess) -> bool:
    try:
        await service.notify.wait_for("READY", "1")
    except AssertionError:
        return False
    return True


async def test_sighup_revokes_a_key_without_dropping_a_stream_and_a_broken_file_keeps_the_keys(
        state_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    keys_path = tmp_path / "api-keys.json"
    config = own_state_config(tmp_path, state_dir, port, keys_path, CHAT)
    cli = ("--config", str(config))
    streaming = edgefleet("keys", "add", "streaming", "--scope", "infer", *cli).stdout.strip()
    other = edgefleet("keys", "add", "other", "--scope", "infer", *cli).stdout.strip()
    service = ServiceProcess(config, tmp_path)
    try:
        if service.proc.poll() is not None or not await ready(service):
            raise AssertionError(service.log())
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"model": CHAT, "messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 120,
                "stream": True, "stream_options": {"include_usage": True}}
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json=body, headers=bearer(streaming)) as stream:
                assert stream.status == 200
                first = await stream.content.readline()
                assert first.startswith(b"data: ")
                revoked = edgefleet("keys", "revoke", "streaming", *cli)  # signals the agent itself
                assert revoked.returncode == 0 and "reloads its keys" in revoked.stdout, revoked
                await service.notify.wait_for("READY", "1", count=2)  # the reload is done
                async with http.post(url, json={**body, "stream": False}, headers=bearer(streaming)) as after:
                    assert after.status == 401
                rest = [line.decode().strip() for line in (await stream.read()).splitlines() if line.strip()]
            assert rest[-1] == "data: [DONE]", rest[-3:]
            assert any('"usage"' in line for line in rest)  # the admitted stream ran to its end
            # a malformed file at reload: the keys in force stay, the log and doctor say why
            keys_path.write_text('{"version": 1, "keys": [{"name": "broken"}]}')
            keys_path.chmod(0o600)
            service.signal(signal.SIGHUP)
            await service.notify.wait_for("READY", "1", count=3)
            async with http.post(url, json={**body, "stream": False, "max_tokens": 2}, headers=bearer(other)) as ok:
                assert ok.status == 200, await ok.text()
        assert "API keys not reloaded, the keys in force stay" in service.log()
        doctor = edgefleet("doctor", *cli)
        assert "[FAIL] api keys" in doctor.stdout and "keys[0]" in doctor.stdout, doctor.stdout
    finally:
        service.stop()
    # at start, the same file stops the agent with one line saying why
    started = edgefleet("serve", *cli)
    assert started.returncode != 0
    assert "cannot use the API keys" in started.stderr and str(keys_path) in started.stderr, started.stderr
    assert "Traceback" not in started.stderr
    keys_path.chmod(0o644)
    doctor = edgefleet("doctor", *cli)
    assert "chmod 600" in doctor.stdout


def test_start_refuses_a_keys_file_others_can_read(state_dir: Path, tmp_path: Path) -> None:
    keys_path = tmp_path / "api-keys.json"
    keys_path.write_text('{"version": 1, "keys": []}')
    keys_path.chmod(0o644)
    config = own_state_config(tmp_path, state_dir, free_port(), keys_path)
    started = edgefleet("serve", "--config", str(config))
    assert started.returncode != 0 and "mode 0644" in started.stderr and "chmod 600" in started.stderr



def test_the_cli_reaches_an_agent_guarded_by_named_keys_with_edgefleet_api_key(agent, keys) -> None:
    """With named keys and no server.api_key in the CLI's config, `models ps` says it was refused;
    with an admin key in $EDGEFLEET_API_KEY it lists what the agent has loaded."""
    port = agent.url.rsplit(":", 1)[1]
    base = {**os.environ, "EDGEFLEET_CONFIG": "", "EDGEFLEET_SERVER__PORT": port}
    base.pop("EDGEFLEET_API_KEY", None)

    def ps(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent", "models", "ps", "--json"], check=False,
                              capture_output=True, text=True, env=env, timeout=120)

    refused = ps(base)
    assert refused.returncode == 1 and "key" in refused.stderr.lower(), refused
    assert "Traceback" not in refused.stderr
    listed = ps({**base, "EDGEFLEET_API_KEY": keys["ops"]})
    assert listed.returncode == 0, listed.stderr
    assert {m["name"] for m in json.loads(listed.stdout)} >= {CHAT, EMBED}
