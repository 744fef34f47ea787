"""Requests that are broken at the HTTP level get the API's own JSON error, never a 500,
never the request's bytes echoed back, never a traceback in the log; and the agent
keeps serving."""

from __future__ import annotations

import asyncio
import gzip
import logging
import zlib
from collections.abc import Callable

import pytest
from conftest import EMBED
from rawhttp import exchange, parse, read_all

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
    ("gzip cut short", post("/v1/embeddings", gzip.compress(EMBED_BODY)[:-12], "Content-Encoding: gzip"), 415),
    ("gzip cut inside its data", post("/v1/embeddings", gzip.compress(EMBED_BODY)[:25], "Content-Encoding: gzip"),
     415),
    ("deflate cut short", post("/v1/embeddings", zlib.compress(EMBED_BODY)[:-3], "Content-Encoding: deflate"), 415),
    ("gzip followed by junk", post("/v1/embeddings", gzip.compress(EMBED_BODY) + SECRET_MARK,
                                   "Content-Encoding: gzip"), 415),
    ("kserve path, gzip cut short", post(f"/v2/models/{EMBED}/infer", gzip.compress(b'{"inputs": []}')[:-8],
                                         "Content-Encoding: gzip"), 415),
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
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    for encoding, data in (("gzip", gzip.compress(EMBED_BODY)), ("deflate", zlib.compress(EMBED_BODY)),
                           ("gzip", gzip.compress(EMBED_BODY[:10]) + gzip.compress(EMBED_BODY[10:])),  # 2 members
                           ("deflate", raw_deflate.compress(EMBED_BODY) + raw_deflate.flush())):  # no zlib header
        response = await exchange(port, post("/v1/embeddings", data, f"Content-Encoding: {encoding}",
                                             "Connection: close"))
        assert response is not None and response.status == 200, (encoding, response)


async def test_brotli_bodies_are_read_whole_or_refused(agent):
    brotli = pytest.importorskip("brotli")  # br is decoded when its decoder is installed
    port = int(agent.url.rsplit(":", 1)[1])
    for data, status in ((brotli.compress(EMBED_BODY), 200), (brotli.compress(EMBED_BODY)[:-4], 415)):
        response = await exchange(port, post("/v1/embeddings", data, "Content-Encoding: br"))
        assert response is not None and response.status == status, response


async def test_a_small_compressed_body_that_expands_past_the_limit_is_413(make_agent):
    async with make_agent(models=(EMBED,), max_body_bytes=4096) as agent:
        port = int(agent.url.rsplit(":", 1)[1])
        bomb = gzip.compress(b'{"model": "x", "input": "' + b"a" * 1_000_000 + b'"}')  # 1 MB in 1 KB
        response = await exchange(port, post("/v1/embeddings", bomb, "Content-Encoding: gzip"))
        assert response is not None and response.status == 413, response
        assert response.json()["error"]["code"] == "request_too_large"


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


async def test_two_authorization_headers_are_refused_with_400(make_agent):
    """Which of two credentials counts differs between proxies and servers: refuse the request."""
    async with make_agent(models=(EMBED,), api_key=KEY) as agent:
        port = int(agent.url.rsplit(":", 1)[1])
        for first, second in ((f"Bearer {KEY}", "Bearer wrong-key-000"), ("Bearer wrong-key-000", f"Bearer {KEY}"),
                              (f"Bearer {KEY}", f"Bearer {KEY}")):
            response = await exchange(port, post("/v1/embeddings", EMBED_BODY, f"Authorization: {first}",
                                                 f"Authorization: {second}"))
            assert response is not None and response.status == 400, response
            error = response.json()["error"]
            assert error["code"] == "duplicate_authorization" and "2 Authorization headers" in error["message"]
            assert KEY.encode() not in response.body
        response = await exchange(port, post("/v1/embeddings", EMBED_BODY, f"Authorization: Bearer {KEY}"))
        assert response is not None and response.status == 200


async def _upload(port: int, head: bytes, frame: Callable[[bytes], bytes], total: int) -> tuple[bytes, int, str]:
    """Send `head`, then body chunks (each through `frame`) up to `total` bytes while reading the
    answer; (the answer, the body bytes the server let in, how the upload ended)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.ensure_future(read_all(reader))
    writer.write(head)
    chunk, sent, ended = b"x" * 65536, 0, "the whole body was sent"
    try:
        while sent < total:
            writer.write(frame(chunk))
            await asyncio.wait_for(writer.drain(), 10)  # a server that stops reading without closing: TimeoutError
            sent += len(chunk)
    except ConnectionError:
        ended = "the server closed the connection"
    except TimeoutError:
        ended = "the server stopped reading but kept the connection open"
    finally:
        writer.close()
    return await asyncio.wait_for(answer, 10), sent, ended


async def test_a_body_over_the_limit_is_answered_at_once_and_the_connection_closed(agent):
    """A client uploading 100 MB to an 8 MB limit gets its 413 while it is still sending, and the
    connection is closed: the agent does not read (and discard) the other 92 MB first."""
    port = int(agent.url.rsplit(":", 1)[1])
    total = 100 * 1024 * 1024
    sized = (f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {total}\r\n\r\n").encode()
    chunked = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    for head, frame in ((sized, lambda c: c), (chunked, lambda c: b"%x\r\n%s\r\n" % (len(c), c))):
        answer, sent, ended = await _upload(port, head, frame, total)
        response = parse(answer)
        print(f"{sent / 2**20:.1f} MB of {total / 2**20:.0f} MB sent: {ended}")
        assert response is not None and response.status == 413, answer[:300]
        assert response.json()["error"]["code"] == "request_too_large"
        assert ended == "the server closed the connection", (ended, sent)
        # what got in is the limit plus what the kernel's socket buffers held, not the whole body
        assert sent < total // 2, f"{sent / 2**20:.0f} MB of {total / 2**20:.0f} MB were read"
    status, _, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": "still serving"})
    assert status == 200
