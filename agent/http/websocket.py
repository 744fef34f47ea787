"""Chat over one WebSocket: ``GET /v1/realtime``, several requests in flight, each with its id.

The text events of the OpenAI Realtime API, so a client written for it finds its names:
the client sends ``response.create`` (its ``response`` is a /v1/chat/completions body, and
its ``event_id`` names the response) and ``response.cancel`` (``response_id``); the agent
answers ``response.created``, ``response.output_text.delta`` and ``response.done`` (status,
finish_reason, usage), or ``error`` naming the event it answers. A request with ``logprobs``
gets them as the Responses API streams them: each delta's ``logprobs`` are its tokens' (the
chat stream's ``logprobs.content`` entries), and ``response.done`` has them all. docs/api.md
has the format.

Each request goes the chat endpoint's way (agent/http/openai_api.py): the same parsing and
400s (agent/http/openai_requests.py), the same model checks and token accounting for the
caller's key (agent/http/gate.py; the gate middleware authenticates the upgrade request, so
a key without ``infer`` never gets a socket, and each response is admitted by the gate as one
call, so a key's request, token and concurrency limits hold on a socket as over HTTP), the
same scheduler, where a cancel stops the sequence at the next step and frees its slot.

Why the writing goes through one `Outbox`: the streams' deltas are coalesced per stream
while a write is under way (one frame per stream per engine step, not one per token), and
a client that stops reading holds at most ``limits.websocket_buffer_bytes`` here plus aiohttp's writer buffer:
a write that waits ``server.write_timeout_s`` drops the connection, and with it every
stream it carried. The heartbeat drops a client that answers no ping in that time too.

Bad input is answered, never traceback'd: a frame over ``server.max_body_bytes`` is closed
with 1009 (aiohttp), binary frames, non-JSON and unknown events get an ``error`` event and
the connection goes on, and a client sending more than ``limits.websocket_messages_per_s`` gets ``error``
events and then close 1008, so a flood costs other clients nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from agent.context import LIVE
from agent.http.errors import ApiError, to_api_error
from agent.http.gate import GATE, identity_of
from agent.http.jsonio import dumps, loads
from agent.http.keep_alive import keep_alive
from agent.http.openai_api import count_usage, finish_reason, served_for
from agent.http.openai_choices import chat_logprobs
from agent.http.openai_requests import ParsedGeneration, parse_chat
from runtime.backend import Capability, GenerationResult, TextDelta, TokenLogprob
from runtime.gguf.tool_calls import read_answer
from runtime.scheduling.scheduler import Job
from runtime.served_model import ServedModel

log = logging.getLogger(__name__)

PATH = "/v1/realtime"
#: Messages over the rate (``limits.websocket_messages_per_s``, agent/config.py, read when a
#: connection opens, as the in-flight and buffer limits are) answered with an error event
#: before the connection is closed with 1008.
MAX_OVER_LIMIT = 10
#: Longest client-chosen id.
MAX_ID_CHARS = 128


def setup(app: web.Application) -> None:
    app.router.add_get(PATH, realtime)


class Outbox:
    """Events for one client, bounded in bytes, written by one task; deltas of a stream that
    wait together leave as one event."""

    def __init__(self, ws: web.WebSocketResponse, timeout_s: float, limit: int) -> None:
        self._ws, self._timeout_s, self._limit = ws, timeout_s, limit
        self._events: list[dict[str, Any]] = []
        self._bytes = 0
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._serial = 0
        self.stalled = False

    async def put(self, event: dict[str, Any]) -> None:
        """Queue `event`; waits while the outbox is over its bound (the writer drops the client
        that keeps it there)."""
        while self._bytes > self._limit:
            self._space.clear()
            await self._space.wait()
        self.put_nowait(event)

    def put_nowait(self, event: dict[str, Any]) -> None:
        """Queue `event` past the bound (errors about the client's own input: few and small)."""
        self._events.append(event)
        self._bytes += len(event.get("delta", "")) + 128 + sum(64 + 64 * len(item["top_logprobs"])
                                                                for item in event.get("logprobs", ()))
        self._idle.clear()
        self._ready.set()

    def _take(self) -> list[dict[str, Any]]:
        events, self._events, self._bytes = self._events, [], 0
        self._space.set()
        merged: list[dict[str, Any]] = []
        last_delta: dict[str, dict[str, Any]] = {}  # response id -> its delta still open for more text
        for event in events:
            rid = event.get("response_id") or event.get("response", {}).get("id")
            if event["type"] == "response.output_text.delta":
                if rid in last_delta:
                    last_delta[rid]["delta"] += event["delta"]
                    if "logprobs" in event:  # the tokens of the merged text, in order
                        last_delta[rid].setdefault("logprobs", []).extend(event["logprobs"])
                    continue
                last_delta[rid] = dict(event)
                merged.append(last_delta[rid])
                continue
            last_delta.pop(rid, None)
            merged.append(event)
        return merged

    async def run(self) -> None:
        """Write until cancelled; a write that waits past the timeout aborts the connection."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            for event in self._take():
                self._serial += 1
                event["event_id"] = f"event_{self._serial}"
                try:
                    await asyncio.wait_for(self._ws.send_str(dumps(event)), self._timeout_s)
                except TimeoutError:
                    self.stalled = True
                    raise
                except ConnectionError:
                    return
            if not self._events:
                self._idle.set()

    async def flush(self) -> None:
        """Wait until what is queued has been written (at most the write timeout)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self._timeout_s)


def _error(code: str, message: str, answers: str | None, status: int = 400,
           param: str | None = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "code": code, "message": message, "param": param,
                                       "event_id": answers, "status": status}}


class Connection:
    """One client's socket: its streams by id, its message rate, its outbox."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, timeout_s: float) -> None:
        self.request, self.ws = request, ws
        limits = request.app[LIVE].config.limits
        self.max_in_flight, self.rate = limits.websocket_max_in_flight, limits.websocket_messages_per_s
        self.outbox = Outbox(ws, timeout_s, limits.websocket_buffer_bytes)
        self.streams: dict[str, asyncio.Task[None]] = {}
        self.cancelled: set[str] = set()
        self.created: set[str] = set()  # responses whose response.created went out
        self._allowance = 2 * self.rate
        self._seen = time.monotonic()
        self._over = 0

    def _within_rate(self) -> bool:
        now = time.monotonic()
        self._allowance = min(2 * self.rate, self._allowance + (now - self._seen) * self.rate)
        self._seen = now
        if self._allowance >= 1:
            self._allowance -= 1
            return True
        self._over += 1
        return False

    async def serve(self) -> None:
        writer = asyncio.create_task(self.outbox.run(), name="ws-writer")
        reader = asyncio.create_task(self._read(), name="ws-reader")
        try:
            done, _ = await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
            if writer in done and not writer.cancelled() and isinstance(writer.exception(), TimeoutError):
                log.info("dropped a WebSocket client at %s: it read nothing for %gs (server.write_timeout_s)",
                         self.request.remote, self.outbox._timeout_s)
                if self.request.transport is not None:
                    self.request.transport.abort()
        finally:
            tasks = [writer, reader, *self.streams.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self) -> None:
        async for msg in self.ws:
            if not self._within_rate():
                if self._over > MAX_OVER_LIMIT:
                    await self.outbox.flush()  # the error events first, then the close
                    await self.ws.close(code=WSCloseCode.POLICY_VIOLATION,
                                        message=f"more than {self.rate:g} messages a second".encode())
                    return
                self.outbox.put_nowait(_error(
                    "rate_limit_exceeded", f"More than {self.rate:g} messages a second: this one is "
                    "dropped; the connection closes if it goes on", None, 429, kind="rate_limit_error"))
                continue
            if msg.type == WSMsgType.BINARY:
                self.outbox.put_nowait(_error("binary_frame", "Binary frames are not accepted; send each "
                                              "event as a JSON text frame", None))
            elif msg.type == WSMsgType.TEXT:
                self._handle(msg.data)

    def _handle(self, data: str) -> None:
        try:
            event = loads(data.encode())
        except ValueError:
            self.outbox.put_nowait(_error("invalid_json", "The frame is not JSON; send one JSON object "
                                          "per text frame", None))
            return
        if not isinstance(event, dict):
            self.outbox.put_nowait(_error("invalid_event", "An event must be a JSON object", None))
            return
        event_id = event.get("event_id")
        if not isinstance(event_id, str) or not 0 < len(event_id) <= MAX_ID_CHARS:
            event_id = None
        kind = event.get("type")
        if kind == "response.create":
            self._create(event, event_id)
        elif kind == "response.cancel":
            rid = event.get("response_id")
            task = self.streams.get(rid) if isinstance(rid, str) else None
            if task is None:
                self.outbox.put_nowait(_error("response_not_found", f"No response {rid!r} is in flight",
                                              event_id, 404, param="response_id"))
                return
            self.cancelled.add(rid)  # type: ignore[arg-type]
            task.cancel()  # its job stops at the scheduler's next step
        else:
            self.outbox.put_nowait(_error("unknown_event", f"Unknown event type {kind!r}; this endpoint "
                                          "takes response.create and response.cancel", event_id, param="type"))

    def _create(self, event: dict[str, Any], event_id: str | None) -> None:
        if event_id is None:
            self.outbox.put_nowait(_error("missing_event_id", "response.create needs an event_id (a string "
                                          f"of 1 to {MAX_ID_CHARS} characters): it names the response",
                                          None, param="event_id"))
        elif event_id in self.streams:
            self.outbox.put_nowait(_error("duplicate_id", f"A response {event_id!r} is already in flight",
                                          event_id, param="event_id"))
        elif len(self.streams) >= self.max_in_flight:
            self.outbox.put_nowait(_error("too_many_responses", f"{self.max_in_flight} responses are in flight "
                                          "on this connection; wait for one to finish", event_id, 429,
                                          kind="rate_limit_error"))
        elif self.request.app[LIVE].draining:
            self.outbox.put_nowait(_error("shutting_down", "The agent is shutting down and takes no new "
                                          "requests; retry shortly", event_id, 503, kind="unavailable_error"))
        else:
            task = asyncio.create_task(self._respond(event_id, event.get("response")), name=f"ws-{event_id}")
            self.streams[event_id] = task
            task.add_done_callback(lambda _: self.streams.pop(event_id, None))

    async def _generate(self, rid: str, request: web.Request, parsed: ParsedGeneration, body: Any,
                        tokens: list[TokenLogprob]) -> tuple[GenerationResult, list[str], Job[GenerationResult],
                                                             ServedModel]:
        """Run one response on the model, its deltas into the outbox: the chat endpoint's path.
        Each delta carries the log probabilities of the tokens its text came from (when asked,
        as a chat stream's chunks do); all of them are gathered in `tokens`."""
        put = self.outbox.put
        async with keep_alive(request, parsed.model, body):
            served = await served_for(request, parsed.model, Capability.CHAT)
            job = served.generate(parsed.request)
            job.future.add_done_callback(lambda done: count_usage(request, done))
            try:
                await put({"type": "response.created", "response": {
                    "id": rid, "object": "realtime.response", "status": "in_progress", "model": served.name}})
                self.created.add(rid)
                pieces: list[str] = []
                unsent: list[TokenLogprob] = []  # log probabilities whose text has not gone out
                async for item in job.stream():
                    if isinstance(item, TokenLogprob):
                        tokens.append(item)
                        unsent.append(item)
                    elif isinstance(item, TextDelta):
                        pieces.append(item.text)
                        if not parsed.tools:  # a tool answer is read whole, as the chat endpoint does
                            delta = {"type": "response.output_text.delta", "response_id": rid,
                                     "output_index": 0, "content_index": 0, "delta": item.text}
                            if unsent:
                                delta["logprobs"] = chat_logprobs(unsent)["content"]
                                unsent.clear()
                            await put(delta)
                result = job.future.result()
            finally:
                job.cancel()  # no-op when finished; stops the sequence when this task was cancelled
        return result, pieces, job, served

    async def _respond(self, rid: str, body: Any) -> None:
        """One response: created, its deltas, done; or an error event naming `rid`."""
        request, put = self.request, self.outbox.put
        tokens: list[TokenLogprob] = []
        try:
            parsed = parse_chat(body)  # a 400 here is an error event, as the chat endpoint's 400
            identity = identity_of(request)  # each response is a call of the key: its limits apply
            admitted = request.app[GATE].admit(identity, "infer") if identity is not None else contextlib.nullcontext()
            with admitted:
                result, pieces, job, served = await self._generate(rid, request, parsed, body, tokens)
            text = "".join(pieces)
            content, calls = read_answer(text, served.info.tool_format) if parsed.tools else (text, [])
            finish = "tool_calls" if calls else finish_reason(job, result)
            output: dict[str, Any] = {"type": "message", "role": "assistant", "content": content}
            if calls:
                output["tool_calls"] = calls
            if parsed.request.logprobs is not None:  # every token's, as the chat completion's logprobs.content
                output["logprobs"] = chat_logprobs(tokens)["content"]
            await put({"type": "response.done", "response": {
                "id": rid, "object": "realtime.response", "model": served.name,
                "status": "completed" if finish in ("stop", "tool_calls") else "incomplete",
                "finish_reason": finish, "output": [output],
                "usage": {"input_tokens": result.prompt_tokens, "output_tokens": result.completion_tokens,
                          "total_tokens": result.prompt_tokens + result.completion_tokens}}})
        except asyncio.CancelledError:
            if rid not in self.cancelled:
                raise  # the connection is going away: nobody to tell
            self.outbox.put_nowait({"type": "response.done", "response": {
                "id": rid, "object": "realtime.response", "status": "cancelled",
                "finish_reason": "cancelled", "output": [], "usage": None}})
        except Exception as exc:  # the chat endpoint's error, as an event
            err = to_api_error(exc)
            if err.status >= 500 and not isinstance(exc, ApiError):
                log.exception("WebSocket response %s failed", rid)
            self.outbox.put_nowait(_error(err.code or err.type, err.message, rid, err.status,
                                          param=err.param, kind=err.type))
            if rid in self.created:
                self.outbox.put_nowait({"type": "response.done", "response": {
                    "id": rid, "object": "realtime.response", "status": "failed", "output": [], "usage": None}})
        finally:
            self.cancelled.discard(rid)
            self.created.discard(rid)


async def realtime(request: web.Request) -> web.WebSocketResponse:
    """The upgrade (the gate middleware has authenticated it), then the connection's events."""
    config = request.app[LIVE].config.server
    ws = web.WebSocketResponse(heartbeat=config.write_timeout_s, max_msg_size=config.max_body_bytes,
                               compress=False)
    await ws.prepare(request)
    await Connection(request, ws, config.write_timeout_s).serve()
    if not ws.closed:
        await ws.close()
    return ws
