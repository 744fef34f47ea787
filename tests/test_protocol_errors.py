"""Requests that are broken at the HTTP level get the API's own JSON error, never a 500,
never the request's bytes echoed back, never a traceback in the log; and the agent
keeps serving."""

from __future__ import annotations

import gzip
import logging
import zlib

import pytest
from conftest import EMBED
from rawhttp import exchange

KEY = "edge-test-key-123"
SECRET_MARK = b"SECRETMARK"  # put in requests: must never come back in a response


def post(path: str, body: bytes, *headers: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: localhost", f"Content-Length: {len(body)}",
            "Content-Type: application/json", "Connection: close", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


EMBED_BODY = b'{"model": "%s", "input": "hello"}' % EMBED.encode()

CASES = [
    # id, raw request, expected status
    ("header of 200 KB", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + SECRET_MARK * 20_000 + b"\r\n\r\n", 431),
    ("URL of 100 KB", b"GET /v1/models?q=" + SECRET_MARK * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
    ("method that is not a token", b"G{T}" + SECRET_MARK + b" /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("bad chunk size", b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"zz" + SECRET_MARK + b"\r\n{}\r\n0\r\n\r\n", 400),
    ("gzip that is not gzip", post("/v1/embeddings", SECRET_MARK * 10, "Content-Encoding: gzip"), 415),
    ("deflate that is not deflate", post("/v1/embeddings", SECRET_MARK * 10, "Content-Encoding: deflate"), 415),
    ("br that is not br", post("/v1/embeddings", SECRET_MARK * 10, "Content-Encoding: br"), 415),
    ("zstd that is not zstd", post("/v1/embeddings", SECRET_MARK * 10, "Content-Encoding: zstd"), 415),
    ("unknown encoding", post("/v1/embeddings", EMBED_BODY, "Content-Encoding: x-" + SECRET_MARK.decode()), 415),
    ("kserve path, bad gzip", post(f"/v2/models/{EMBED}/infer", SECRET_MARK * 10, "Content-Encoding: gzip"), 415),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_http_level_errors_are_api_json_without_echo_or_traceback(agent, case, caplog):
    _, raw, status = case
    port = int(agent.url.rsplit(":", 1)[1])
    with caplog.at_level(logging.INFO):
        response = await exchange(port, raw)
    assert response is not None and response.status == status, response
    assert response.headers["content-type"].startswith("application/json")
    assert SECRET_MARK not in response.body
    body = response.json()
    if b"/v2/" in raw.split(b"\r\n", 1)[0]:
        assert isinstance(body["error"], str)
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    status, _, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": "still serving"})
    assert status == 200


async def test_compressed_bodies_that_are_valid_are_read(agent):
    port = int(agent.url.rsplit(":", 1)[1])
    for encoding, data in (("gzip", gzip.compress(EMBED_BODY)), ("deflate", zlib.compress(EMBED_BODY))):
        response = await exchange(port, post("/v1/embeddings", data, f"Content-Encoding: {encoding}",
                                             "Connection: close"))
        assert response is not None and response.status == 200, (encoding, response)


async def test_a_non_utf8_authorization_header_is_401_not_500(make_agent):
    async with make_agent(models=(EMBED,), api_key=KEY) as agent:
        port = int(agent.url.rsplit(":", 1)[1])
        for token in (b"Bearer caf\xe9-key", b"Bearer \xff\xfe\x80", b"\xe9\xe9 \xe9"):
            raw = post("/v1/embeddings", EMBED_BODY).replace(b"Host: localhost", b"Host: x\r\nAuthorization: " + token)
            response = await exchange(port, raw)
            assert response is not None and response.status == 401, response
            assert response.json()["error"]["code"] == "invalid_api_key"


async def test_wrong_method_is_405_with_allow(agent):
    async with agent.http.get(agent.url + "/v1/chat/completions") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    async with agent.http.delete(agent.url + f"/v2/models/{EMBED}/infer") as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "POST"
        assert isinstance((await resp.json())["error"], str)


async def test_readyz_shows_failure_reasons_only_with_the_key(make_agent, state_dir):
    async with make_agent(models=(EMBED, "ghost"), api_key=KEY) as agent:
        status, body = await agent.get("/readyz")
        assert status == 503
        assert body["models"] == [{"name": EMBED, "state": "ready"}, {"name": "ghost", "state": "failed"}]
        assert str(state_dir) not in str(body)
        status, body = await agent.get("/readyz", headers={"Authorization": f"Bearer {KEY}"})
        ghost = next(m for m in body["models"] if m["name"] == "ghost")
        assert "not a model bundle" in ghost["reason"]
