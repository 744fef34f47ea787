"""Chat over the WebSocket endpoint (agent/http/websocket.py), against the real demo chat model
with aiohttp's WebSocket client: streams interleave on one connection and say what the HTTP
endpoint says, a cancel stops one stream, a client that stops reading is dropped and its slot
freed, keys are checked at the upgrade, and bad frames get their error event or close code."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import CHAT, demo_config, start_agent
from test_request_gate import auth, make_keys

from agent.config import LimitsConfig
from security.identity import KeyLimits

EOS = 2  # SmolLM2's <|im_end|>; banned so that generation only stops at max_tokens


def ws_url(agent: Any) -> str:
    return agent.url.replace("http://", "ws://") + "/v1/realtime"


def ask(content: str, max_tokens: int = 16, **extra: Any) -> dict[str, Any]:
    return {"model": CHAT, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


async def events_until(ws: aiohttp.ClientWebSocketResponse, done: set[str], timeout: float = 120) -> list[dict]:
    """Events until a response.done has come for every id in `done`."""
    events: list[dict] = []
    waiting = set(done)
    async with asyncio.timeout(timeout):
        while waiting:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            event = json.loads(msg.data)
            events.append(event)
            if event["type"] == "response.done":
                waiting.discard(event["response"]["id"])
    return events


def text_of(events: list[dict], rid: str) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta" and e["response_id"] == rid)


def done_of(events: list[dict], rid: str) -> dict:
    return next(e["response"] for e in events if e["type"] == "response.done" and e["response"]["id"] == rid)


async def test_two_requests_on_one_connection_interleave_and_match_http(agent) -> None:
    bodies = {"a": ask("Tell me about the sea.", 24), "b": ask("Name three colours.", 24)}
    expected = {}
    for rid, body in bodies.items():
        status, reply, _ = await agent.post("/v1/chat/completions", json=body)
        assert status == 200, reply
        expected[rid] = reply
    async with agent.http.ws_connect(ws_url(agent)) as ws:
        for rid, body in bodies.items():
            await ws.send_json({"type": "response.create", "event_id": rid, "response": body})
        events = await events_until(ws, {"a", "b"})
    kinds = [(e["type"], e.get("response_id") or e.get("response", {}).get("id")) for e in events]
    for rid in bodies:
        done = done_of(events, rid)
        assert text_of(events, rid) == expected[rid]["choices"][0]["message"]["content"]
        assert done["output"][0]["content"] == expected[rid]["choices"][0]["message"]["content"]
        assert done["status"] == "completed" or done["finish_reason"] == "length"
        assert done["finish_reason"] == expected[rid]["choices"][0]["finish_reason"]
        assert done["usage"]["output_tokens"] == expected[rid]["usage"]["completion_tokens"]
        assert kinds.index(("response.created", rid)) < kinds.index(("response.done", rid))
    # in flight together: each stream's text began before the other's ended
    first = {rid: kinds.index(("response.output_text.delta", rid)) for rid in bodies}
    assert first["a"] < kinds.index(("response.done", "b")) and first["b"] < kinds.index(("response.done", "a"))
    assert len({e["event_id"] for e in events}) == len(events)


async def test_cancel_stops_one_stream_while_the_other_finishes(agent) -> None:
    cancelled_before = await agent.metric("edgefleet_scheduler_cancelled_total", model=CHAT)
    async with agent.http.ws_connect(ws_url(agent)) as ws:
        await ws.send_json({"type": "response.create", "event_id": "long",
                            "response": ask("Write a long story.", 1500, logit_bias={str(EOS): -100})})
        await ws.send_json({"type": "response.create", "event_id": "short", "response": ask("Hello!", 12)})
        async with asyncio.timeout(120):
            while (event := await ws.receive_json())["type"] != "response.output_text.delta" \
                    or event["response_id"] != "long":
                pass
        await ws.send_json({"type": "response.cancel", "event_id": "c1", "response_id": "long"})
        events = await events_until(ws, {"long", "short"})
        assert done_of(events, "long")["status"] == "cancelled"
        assert done_of(events, "short")["usage"]["output_tokens"] > 0
        await ws.send_json({"type": "response.cancel", "event_id": "c2", "response_id": "long"})
        error = await ws.receive_json()
        assert error["type"] == "error" and error["error"]["code"] == "response_not_found"
        assert error["error"]["event_id"] == "c2"
    assert await agent.metric("edgefleet_scheduler_cancelled_total", model=CHAT) == cancelled_before + 1


def frame(payload: bytes, opcode: int = 1) -> bytes:
    """A masked client frame (RFC 6455), for a client no WebSocket library would be."""
    mask, n = os.urandom(4), len(payload)
    length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    return bytes([0x80 | opcode]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_a_client_that_stops_reading_is_dropped_and_its_slot_freed(make_agent) -> None:
    """Its response (1500 tokens asked) is cancelled, not run to the end, and the next request
    gets the slot. The client is dropped by whichever comes first: the heartbeat it does not
    answer, or a write that waits server.write_timeout_s."""
    async with make_agent(models=(CHAT,), max_pending=1, write_timeout_s=1.0) as agent:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", int(agent.url.rsplit(":", 1)[1])))
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16))
        writer.write(b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 101"), head
        body = ask("Write a long story.", 1500, logit_bias={str(EOS): -100}, temperature=0.8)
        writer.write(frame(json.dumps({"type": "response.create", "event_id": "s", "response": body}).encode()))
        await asyncio.wait_for(reader.readuntil(b"response.created"), 60)  # queued: it holds the one slot
        writer.transport.pause_reading()  # from here on the client reads nothing, nor answers pings

        async with asyncio.timeout(120):  # generous: "does not stall", not a timing
            while await agent.metric("edgefleet_scheduler_cancelled_total", model=CHAT) < 1:
                await asyncio.sleep(0.1)
        assert await agent.metric("edgefleet_scheduler_completed_total", model=CHAT) == 0
        status, reply, _ = await agent.post("/v1/chat/completions", json=ask("Hi", 2))
        assert status == 200 and reply["usage"]["completion_tokens"] == 2
        writer.close()


async def test_a_key_without_infer_is_refused_at_the_upgrade(make_agent, tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys.json", embed=(["embeddings"], KeyLimits()), chat=(["infer"], KeyLimits()))
    async with make_agent(models=(CHAT,), api_keys_file=str(tmp_path / "keys.json")) as agent:
        for headers, status in (({}, 401), (auth(keys["embed"]), 403), (auth("sk-wrong"), 401)):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await agent.http.ws_connect(ws_url(agent), headers=headers)
            assert refused.value.status == status
        async with agent.http.ws_connect(ws_url(agent), headers=auth(keys["chat"])) as ws:
            await ws.send_json({"type": "response.create", "event_id": "r", "response": ask("Hi", 3)})
            events = await events_until(ws, {"r"})
            assert done_of(events, "r")["usage"]["output_tokens"] == 3


async def test_bad_frames_get_error_events_and_the_connection_goes_on(agent) -> None:
    async with agent.http.ws_connect(ws_url(agent)) as ws:
        await ws.send_bytes(b"\x00\x01")
        await ws.send_str("{not json")
        await ws.send_str("[1, 2]")
        await ws.send_json({"type": "session.update", "event_id": "u1"})
        await ws.send_json({"type": "response.create", "event_id": "bad", "response": {"model": CHAT}})
        await ws.send_json({"type": "response.create", "event_id": "nope", "response": ask("Hi") | {"model": "x"}})
        codes = []
        for _ in range(6):
            event = await asyncio.wait_for(ws.receive_json(), 30)
            assert event["type"] == "error", event
            codes.append((event["error"]["code"], event["error"]["event_id"]))
        assert codes == [("binary_frame", None), ("invalid_json", None), ("invalid_event", None),
                         ("unknown_event", "u1"), ("invalid_request_error", "bad"), ("model_not_found", "nope")]
        await ws.send_json({"type": "response.create", "event_id": "ok", "response": ask("Hi", 3)})
        events = await events_until(ws, {"ok"})
        assert done_of(events, "ok")["usage"]["output_tokens"] == 3


async def test_an_oversized_frame_is_closed_with_1009(make_agent) -> None:
    async with make_agent(models=(CHAT,), max_body_bytes=4096) as agent:
        async with agent.http.ws_connect(ws_url(agent)) as ws:
            await ws.send_str(json.dumps({"type": "response.create", "event_id": "big", "response": ask("x" * 4096)}))
            msg = await asyncio.wait_for(ws.receive(), 60)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG, msg
        async with agent.http.ws_connect(ws_url(agent)) as ws:  # the agent goes on
            await ws.send_json({"type": "response.create", "event_id": "ok", "response": ask("Hi", 2)})
            assert done_of(await events_until(ws, {"ok"}), "ok")["usage"]["output_tokens"] == 2


async def test_a_flood_is_refused_then_closed_and_others_are_served(agent) -> None:
    async with agent.http.ws_connect(ws_url(agent)) as ws:
        other = asyncio.create_task(agent.post("/v1/chat/completions", json=ask("Hi", 2)))
        for i in range(10_000):
            if ws.closed:
                break
            with contextlib.suppress(ConnectionError):  # the agent may have closed it already
                await ws.send_str(json.dumps({"type": "response.cancel", "event_id": f"f{i}", "response_id": "none"}))
        errors: list[str] = []
        async with asyncio.timeout(60):
            while (msg := await ws.receive()).type == aiohttp.WSMsgType.TEXT:
                errors.append(json.loads(msg.data)["error"]["code"])
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.POLICY_VIOLATION, msg
        assert "messages a second" in msg.extra
        assert "rate_limit_exceeded" in errors
        status, _, _ = await asyncio.wait_for(other, 120)
        assert status == 200


async def test_a_keys_token_limit_applies_to_each_response_on_the_socket(make_agent, tmp_path: Path) -> None:
    """The chat endpoint's limits per response: a key past its tokens per minute gets 429 as an
    error event for the next response.create, and the connection goes on."""
    keys = make_keys(tmp_path / "keys.json", thrifty=(["infer"], KeyLimits(tokens_per_minute=30)))
    async with make_agent(models=(CHAT,), api_keys_file=str(tmp_path / "keys.json")) as agent, \
            agent.http.ws_connect(ws_url(agent), headers=auth(keys["thrifty"])) as ws:
        await ws.send_json({"type": "response.create", "event_id": "r1",
                            "response": ask("Tell me about the sea.", 40, logit_bias={str(EOS): -100})})
        assert done_of(await events_until(ws, {"r1"}), "r1")["usage"]["output_tokens"] == 40
        await ws.send_json({"type": "response.create", "event_id": "r2", "response": ask("Hi", 2)})
        error = await asyncio.wait_for(ws.receive_json(), 30)
        assert error["type"] == "error" and error["error"]["status"] == 429, error
        assert error["error"]["code"] == "rate_limit_exceeded" and error["error"]["event_id"] == "r2"
        await ws.send_json({"type": "session.update", "event_id": "u"})
        assert (await asyncio.wait_for(ws.receive_json(), 30))["error"]["code"] == "unknown_event"


async def test_logprobs_come_with_the_deltas_and_in_response_done_as_http_gives_them(agent) -> None:
    body = ask("Name three colours.", 12, logprobs=True, top_logprobs=3)
    status, reply, _ = await agent.post("/v1/chat/completions", json=body)
    assert status == 200, reply
    expected = reply["choices"][0]["logprobs"]["content"]
    assert len(expected) == reply["usage"]["completion_tokens"]
    async with agent.http.ws_connect(ws_url(agent)) as ws:
        await ws.send_json({"type": "response.create", "event_id": "lp", "response": body})
        events = await events_until(ws, {"lp"})
    def shape(items: list[dict]) -> list[tuple]:
        """What must match exactly; the values are compared to float rounding, as batched
        and alone may differ there (docs/api.md)."""
        return [(i["token"], i["bytes"], [t["token"] for t in i["top_logprobs"]]) for i in items]

    def values(items: list[dict]) -> list[float]:
        return [v for i in items for v in (i["logprob"], *(t["logprob"] for t in i["top_logprobs"]))]

    done = done_of(events, "lp")["output"][0]["logprobs"]  # token, logprob, bytes, top_logprobs, as HTTP's
    assert shape(done) == shape(expected) and values(done) == pytest.approx(values(expected), abs=1e-4)
    streamed = [item for e in events if e["type"] == "response.output_text.delta" for item in e.get("logprobs", [])]
    assert streamed and shape(streamed) == shape(done[:len(streamed)])  # each delta carries its tokens', in order
    assert values(streamed) == values(done[:len(streamed)])
    assert "".join(item["token"] for item in streamed) == text_of(events, "lp")
    # without logprobs asked, none are sent
    async with agent.http.ws_connect(ws_url(agent)) as ws:
        await ws.send_json({"type": "response.create", "event_id": "plain", "response": ask("Hi", 4)})
        events = await events_until(ws, {"plain"})
    assert not any("logprobs" in e for e in events if e["type"] == "response.output_text.delta")
    assert "logprobs" not in done_of(events, "plain")["output"][0]


async def test_the_in_flight_limit_per_connection_comes_from_the_config(state_dir: Path) -> None:
    config = demo_config(state_dir, (CHAT,))
    config = replace(config, limits=LimitsConfig(websocket_max_in_flight=2))
    async with start_agent(config) as agent, agent.http.ws_connect(ws_url(agent)) as ws:
        for rid in ("a", "b", "c"):
            await ws.send_json({"type": "response.create", "event_id": rid,
                                "response": ask("Write a long story.", 64, logit_bias={str(EOS): -100})})
        events = await events_until(ws, {"a", "b"})
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert [(e["code"], e["event_id"], e["status"]) for e in errors] == [("too_many_responses", "c", 429)]
    assert errors[0]["message"].startswith("2 responses are in flight")
