"""The request gate in a real agent (in process): the route table covers every route, a route
it lacks is refused, limits answer 429 with OpenAI's headers, and a flood of bad keys from one
source is slowed down and audited in summary. Scoped keys with real clients over both
transports are in tests/test_api_keys.py."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import CHAT, EMBED, demo_config

from agent.app import create_app
from agent.context import AUDIT
from agent.http.gate import GATE, flush_failures
from agent.http.server import start_server
from security.gate import GRPC_SCOPES, ROUTE_SCOPES, TokenBucket, duration
from security.identity import KeyLimits
from security.keys_file import (
    KeyEntry,
    KeyFileError,
    KeysDocument,
    hash_secret,
    new_secret,
    parse_keys,
    write_keys_file,
)

REPO = Path(__file__).resolve().parent.parent
RATE_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
                "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


def make_keys(path: Path, **keys: tuple[list[str], KeyLimits]) -> dict[str, str]:
    """A keys file with one key per name (scopes, limits); the secrets by name."""
    secrets, entries = {}, []
    for name, (scopes, limits) in keys.items():
        secret, key_id = new_secret()
        secrets[name] = secret
        entries.append(KeyEntry(scopes=scopes, limits=limits, name=name, id=key_id,
                                sha256=hash_secret(secret.encode()).hex()))
    write_keys_file(path, KeysDocument(keys=entries))
    return secrets


async def metric(agent: Any, secret: str, name: str, **labels: str) -> float:
    """A sample from /metrics, read with a key that has the metrics scope (0 if absent)."""
    status, text = await agent.get("/metrics", headers=auth(secret))
    assert status == 200, text
    return sum(float(line.rsplit(" ", 1)[1]) for line in str(text).splitlines()
               if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()))


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def chat(max_tokens: int, stream: bool = False) -> dict[str, object]:
    return {"model": CHAT, "messages": [{"role": "user", "content": "Tell me about the sea."}],
            "max_tokens": max_tokens, "stream": stream, "logit_bias": {"2": -100}}


def test_every_route_of_the_real_app_and_every_grpc_method_has_a_scope(state_dir: Path) -> None:
    app = create_app(demo_config(state_dir, models=()))
    routes = {resource.canonical for resource in app.router.resources()}
    assert routes - ROUTE_SCOPES.keys() == set(), "give these routes a scope in security/gate.py ROUTE_SCOPES"
    assert ROUTE_SCOPES.keys() - routes == set(), "ROUTE_SCOPES names routes the app no longer has"
    proto = (REPO / "agent/kserve/proto/open_inference_grpc.proto").read_text()
    assert set(re.findall(r"^\s*rpc (\w+)\(", proto, re.M)) == GRPC_SCOPES.keys()


async def test_a_route_missing_from_the_table_is_refused_whatever_the_key(state_dir: Path, tmp_path: Path) -> None:
    """A new endpoint that forgot its scope entry answers 403, with or without keys configured."""
    for server in ({}, {"api_key": "config-key-0123456789"}):
        config = demo_config(state_dir, models=(), **server)
        app = create_app(config)

        async def forgotten(request: web.Request) -> web.Response:
            return web.json_response({"leaked": True})

        app.router.add_get("/v1/forgotten", forgotten)
        runner = await start_server(app, config.server)
        try:
            async with aiohttp.ClientSession() as http, \
                    http.get(f"http://127.0.0.1:{config.server.port}/v1/forgotten",
                             headers=auth("config-key-0123456789")) as response:
                body = await response.json()
                assert response.status == 403 and body["error"]["code"] == "route_not_allowed", body
        finally:
            await runner.cleanup()


async def test_requests_per_minute_over_its_limit_get_429_with_openais_headers(make_agent, tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys.json", app=(["embeddings"], KeyLimits(requests_per_minute=3,
                                                                              tokens_per_minute=100_000)),
                     ops=(["metrics"], KeyLimits()))
    async with make_agent(models=(EMBED,), api_keys_file=str(tmp_path / "keys.json")) as agent:
        body = {"model": EMBED, "input": "hello"}
        for remaining in ("2", "1", "0"):
            status, _, headers = await agent.post("/v1/embeddings", json=body, headers=auth(keys["app"]))
            assert status == 200 and headers["x-ratelimit-remaining-requests"] == remaining
        status, error, headers = await agent.post("/v1/embeddings", json=body, headers=auth(keys["app"]))
        assert status == 429, error
        assert error["error"]["code"] == "rate_limit_exceeded" and error["error"]["type"] == "rate_limit_error"
        assert "3 requests per minute" in error["error"]["message"]
        assert 1 <= int(headers["Retry-After"]) <= 20  # 60 s / 3 requests
        assert all(name in headers for name in RATE_HEADERS), dict(headers)
        assert headers["x-ratelimit-limit-requests"] == "3" and headers["x-ratelimit-limit-tokens"] == "100000"
        assert re.fullmatch(r"\d+(\.\d)?s|\d+ms", headers["x-ratelimit-reset-requests"])
        # under /v2 the same refusal is KServe's JSON
        status, error, headers = await agent.post(f"/v2/models/{EMBED}/infer", json={"inputs": []},
                                                  headers=auth(keys["app"]))
        assert status == 403  # embeddings only: tensors is not its scope, checked before its rate
        assert await metric(agent, keys["ops"], "edgefleet_key_requests_total", key="app", outcome="rate_limited") == 1


async def test_concurrent_calls_over_its_limit_get_429_while_the_first_streams(make_agent, tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys.json", one=(["infer"], KeyLimits(concurrent=1)))
    async with make_agent(models=(CHAT,), api_keys_file=str(tmp_path / "keys.json")) as agent, \
            agent.http.post(agent.url + "/v1/chat/completions", json=chat(60, stream=True),
                            headers=auth(keys["one"])) as stream:
        assert stream.status == 200
        await stream.content.readline()  # the first call is in flight
        status, error, headers = await agent.post("/v1/chat/completions", json=chat(2), headers=auth(keys["one"]))
        assert status == 429 and error["error"]["code"] == "concurrency_limit_exceeded", error
        assert headers["Retry-After"] == "1"
        assert (await stream.read()).rstrip().endswith(b"data: [DONE]")
        status, _, _ = await agent.post("/v1/chat/completions", json=chat(2), headers=auth(keys["one"]))
        assert status == 200  # its slot is free again


async def test_tokens_over_the_minutes_budget_get_429_after_the_call_that_spent_them(
        make_agent, tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys.json", thrifty=(["infer"], KeyLimits(tokens_per_minute=30)),
                     ops=(["metrics"], KeyLimits()))
    async with make_agent(models=(CHAT,), api_keys_file=str(tmp_path / "keys.json")) as agent:
        status, reply, headers = await agent.post("/v1/chat/completions", json=chat(40), headers=auth(keys["thrifty"]))
        assert status == 200 and reply["usage"]["total_tokens"] > 30
        assert headers["x-ratelimit-limit-tokens"] == "30"
        status, error, headers = await agent.post("/v1/chat/completions", json=chat(2), headers=auth(keys["thrifty"]))
        assert status == 429 and "tokens" in error["error"]["message"], error
        assert headers["x-ratelimit-remaining-tokens"] == "0" and int(headers["Retry-After"]) >= 1
        used = reply["usage"]
        tokens = {kind: await metric(agent, keys["ops"], "edgefleet_key_tokens_total", key="thrifty", kind=kind)
                  for kind in ("prompt", "completion")}
        assert tokens == {"prompt": used["prompt_tokens"], "completion": used["completion_tokens"]}


async def test_a_flood_of_bad_keys_is_slowed_per_source_and_audited_in_summary(make_agent, tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys.json", good=(["embeddings", "metrics"], KeyLimits()))
    async with make_agent(models=(EMBED,), api_keys_file=str(tmp_path / "keys.json"),
                          auth_failures_per_minute=5) as agent:
        bad = ["efk_0123456789ab_" + "A" * 43, "nope", "", "x" * 4000, "efk_", "Bearer", "wrong-again"]
        statuses = []
        for key in bad:
            status, body, headers = await agent.post("/v1/embeddings", json={"model": EMBED, "input": "x"},
                                                     headers={"Authorization": f"Bearer {key}"})
            statuses.append(status)
        assert statuses == [401] * 5 + [429] * 2
        assert body["error"]["code"] == "too_many_auth_failures" and 1 <= int(headers["Retry-After"]) <= 60
        status, _, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": "x"},
                                        headers=auth(keys["good"]))
        assert status == 200  # a valid key from the same source still passes
        assert await metric(agent, keys["good"], "edgefleet_auth_failures_total") == 7
        audit = agent.app.get(AUDIT)  # [audit] is on by default
        assert audit is not None
        before = len(_audit_records(audit.directory, wait=False))
        flush_failures(agent.app, 0.0)  # what the gate's task does once a minute
        flush_failures(agent.app, 0.0)  # nothing new: no second record
        assert agent.app[GATE].take_failure_summaries(0.0) == []
    records = _audit_records(audit.directory)[before:]  # one record for the flood, with its count
    flood = [r for r in records if r.get("action") == "auth.failed" and r.get("target") == "127.0.0.1"]
    assert len(flood) == 1, records[-5:]
    assert flood[0]["outcome"] == "denied" and flood[0]["actor"] == "anonymous"
    assert flood[0]["detail"]["count"] == "7" and "unknown" in flood[0]["detail"]["reasons"]


def _audit_records(directory: Path, wait: bool = True) -> list[dict[str, Any]]:
    """The records in the audit log (waiting up to 10 s for an auth.failed one to be written)."""
    deadline = time.monotonic() + 10
    while True:
        lines = (directory / "audit.log").read_text().splitlines() if (directory / "audit.log").exists() else []
        records = [json.loads(line) for line in lines if line.strip()]
        if not wait or any(r.get("action") == "auth.failed" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def test_token_buckets_refill_and_say_when() -> None:
    bucket = TokenBucket(60, 60.0, now=0.0)
    bucket.take(60, now=0.0)
    assert bucket.available(now=0.5) == pytest.approx(0.5)
    assert bucket.wait_for(1, now=0.5) == pytest.approx(0.5)
    bucket.take(10, now=1.0)  # spent after the call: may go below zero
    assert bucket.available(now=1.0) == pytest.approx(-9.0)
    assert bucket.reset_s(now=1.0) == pytest.approx(69.0)
    assert [duration(s) for s in (0.017, 1.0, 1.25, 360.0, 3725.0)] == ["17ms", "1s", "1.3s", "6m0s", "1h2m5s"]


def test_a_keys_file_that_is_wrong_says_where(tmp_path: Path) -> None:
    for text, where in (('{"keys": [{"name": "a"}]}', "keys[0].scopes"), ("[1]", "JSON object"),
                        ('{"keys": [{"name": "a", "scopes": ["fly"], "id": "0123456789ab", "sha256": "' + "0" * 64
                         + '"}]}', "unknown scope 'fly'"), ("{", "not valid JSON"),
                        ('{"version": 2}', "version 2")):
        with pytest.raises(KeyFileError, match=re.escape(where)):
            parse_keys(text.encode(), "keys.json")


async def test_no_keys_configured_means_open_as_before(make_agent) -> None:
    async with make_agent(models=(EMBED,)) as agent:
        status, _, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": "x"},
                                        headers={"Authorization": "Bearer anything-at-all"})
        assert status == 200
        assert (await agent.get("/metrics"))[0] == 200


async def test_admin_calls_are_audited_with_the_keys_name_allowed_or_denied(make_agent, tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys.json", operator=(["admin"], KeyLimits()), app=(["embeddings"], KeyLimits()))
    async with make_agent(models=(EMBED,), api_keys_file=str(tmp_path / "keys.json")) as agent:
        audit = agent.app.get(AUDIT)
        assert audit is not None
        before = len(_audit_records(audit.directory, wait=False))
        status, body, _ = await agent.post(f"/v2/repository/models/{EMBED}/load", headers=auth(keys["app"]))
        assert status == 403 and "'admin'" in body["error"], body  # KServe's form under /v2
        status, _, _ = await agent.post(f"/v2/repository/models/{EMBED}/load", headers=auth(keys["operator"]))
        assert status == 200
        deadline = time.monotonic() + 10
        while len(loads := [r for r in _audit_records(audit.directory, wait=False)[before:]
                            if r.get("action") == "model.load"]) < 2:
            assert time.monotonic() < deadline, loads
            time.sleep(0.1)
    assert [(r["actor"], r["target"], r["outcome"]) for r in loads] == [("app", EMBED, "denied"),
                                                                        ("operator", EMBED, "ok")]
