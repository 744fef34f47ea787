"""The OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

Responses follow OpenAI's shapes closely enough for the official client to
work unmodified, including SSE streaming with ``data: [DONE]`` and
``stream_options.include_usage``. A streamed request does not send its headers
until the model has produced its first piece of text (or failed), so errors
found while preparing the prompt — a context that does not fit — are still
proper 400s and not a broken stream.

A generation the runtime stopped early says why in `finish_reason`: "length" when
it reached the per-request model-time limit (as llama.cpp's server does for its
time limit), "shutdown" when the agent stopped it at the drain deadline.

A stream whose client reads nothing for ``server.write_timeout_s`` (a send still
waiting on full buffers) is ended as if the client had left: the connection is
aborted and the generation cancelled, so its model slot goes to the next request.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response

from agent.context import LIVE, MODELS
from agent.http.bodies import read_json
from agent.http.errors import ApiError, bad_request
from agent.http.gate import check_model, identity_of, record_usage
from agent.http.jsonio import dumps, json_response
from agent.http.keep_alive import keep_alive
from agent.http.openai_choices import chat_logprobs, completion_logprobs, tool_call_deltas
from agent.http.openai_requests import (
    ParsedEmbedding,
    ParsedGeneration,
    parse_chat,
    parse_completion,
    parse_embedding,
)
from runtime.backend import Capability, GenerationResult, TextDelta, TokenLogprob
from runtime.errors import ShuttingDownError
from runtime.gguf.tool_calls import read_answer
from runtime.registry import ModelState, ModelStatus
from runtime.scheduling.scheduler import STOP_SHUTDOWN, STOP_TIME_LIMIT, Job
from runtime.served_model import ServedModel

log = logging.getLogger(__name__)

#: False only to measure the old way (bench/bench_load.py's A/B): one write per SSE event.
WRITE_PER_STEP = "write" not in os.environ.get("EDGEFLEET_BENCH_OLD_PATHS", "").split(",")


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)


def _model_card(status: ModelStatus, keep_alive_s: float) -> dict[str, Any]:
    info = status.info
    card: dict[str, Any] = {
        "id": status.name,
        "object": "model",
        "created": int(status.loaded_at or 0),
        "owned_by": "edgefleet",
        "version": status.version,
    }
    if info is not None:  # known once it has loaded (kept while it is unloaded for being idle)
        card["capabilities"] = sorted(c.value for c in info.capabilities)
        card["context_length"] = info.context_length
    # "ready"; "unloaded": idle past keep_alive_s, reloaded by the next request;
    # "unloading" / "loading" while that happens; "failed" with its reason
    card["state"] = status.state.value
    card["status"] = {"state": status.state.value} | (
        {"reason": status.error or "failed"} if status.state is ModelState.FAILED else {})
    card["keep_alive_s"] = keep_alive_s
    return card


def _listed(request: web.Request, every: bool = False) -> dict[str, dict[str, Any]]:
    """Cards of the models the caller may use: every configured one with its state (`every`),
    or only those that answer requests (ready, or unloaded and reloaded on demand)."""
    models = request.app[MODELS]
    identity = identity_of(request)  # a key limited to some models sees only those
    return {s.name: _model_card(s, models.keep_alive_for(s.name)) for s in models.statuses()
            if (every or (s.state is not ModelState.FAILED and s.info is not None))
            and (identity is None or identity.may_use(s.name))}


async def list_models(request: web.Request) -> web.Response:
    return json_response({"object": "list", "data": list(_listed(request, every=True).values())})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    card = _listed(request).get(name)
    if card is None:
        request.app[MODELS].get(name)  # raises: unknown (404) or not ready (503)
        raise ApiError(404, f"The model '{name}' does not exist")
    return json_response(card)


async def served_for(request: web.Request, name: str, capability: Capability) -> ServedModel:
    check_model(request, name)  # 403 for a model the caller's key may not use
    served = await request.app[MODELS].acquire(name)  # reloads a model unloaded for being idle
    if capability not in served.info.capabilities:
        can = ", ".join(sorted(c.value for c in served.info.capabilities))
        raise ApiError(
            400, f"The model '{name}' does not support {capability.value} (it supports: {can})",
            param="model", code="unsupported_operation",
        )
    return served


async def _texts(request: web.Request, served: ServedModel, job: Job[GenerationResult]) -> AsyncIterator[str]:
    async for item in job.stream():  # time to first token is counted by the runtime
        if isinstance(item, TextDelta):
            yield item.text


async def _items(job: Job[GenerationResult]) -> AsyncIterator[TextDelta | TokenLogprob]:
    """Text pieces and (when asked) each token's log probability, in the order generated."""
    async for item in job.stream():
        if isinstance(item, (TextDelta, TokenLogprob)):
            yield item


async def _item_batches(job: Job[GenerationResult]) -> AsyncIterator[list[TextDelta | TokenLogprob]]:
    """`_items`, every one already generated at once: what one engine step gave the stream
    (several steps' when the loop fell behind)."""
    async for items in job.batches():
        if WRITE_PER_STEP:
            batch = [item for item in items if isinstance(item, (TextDelta, TokenLogprob))]
            if batch:
                yield batch
        else:
            for item in items:
                if isinstance(item, (TextDelta, TokenLogprob)):
                    yield [item]


class EventStream(EventSourceResponse):
    """aiohttp-sse's response with one more way to send: several events in one write."""

    async def send_all(self, events: list[str]) -> None:
        """Each of `events` as its own SSE event (``data:`` lines, as `send` writes them), all
        in one write to the socket, under `send`'s timeout and with its error handling."""
        if not WRITE_PER_STEP:
            for data in events:
                await self.send(data)
            return
        sep = self._sep
        text = "".join("".join(f"data: {line}{sep}" for line in self.LINE_SEP_EXPR.split(data)) + sep
                       for data in events)
        try:
            async with asyncio.timeout(self._send_timeout):
                await self.write(text.encode("utf-8"))
        except ConnectionResetError:
            self.stop_streaming()
            raise
        except TimeoutError:
            self.stop_streaming()
            self._abort_transport()
            raise


def finish_reason(job: Job[GenerationResult], result: GenerationResult) -> str:
    """The result's finish_reason, with a stop by the runtime said as why it stopped."""
    if result.finish_reason != "cancelled":
        return result.finish_reason
    return {STOP_TIME_LIMIT: "length", STOP_SHUTDOWN: "shutdown"}.get(job.stop_reason or "", "cancelled")


def _usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    parsed = parse_chat(body)
    async with keep_alive(request, parsed.model, body):  # Ollama's per-request keep_alive
        return await _generate(request, parsed, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    parsed = parse_completion(body)
    async with keep_alive(request, parsed.model, body):
        return await _generate(request, parsed, chat=False)


def count_usage(request: web.Request, done: asyncio.Future[GenerationResult]) -> None:
    """Count what a generation used against the caller's key (agent/http/gate.py), whenever it
    ends: also when its client left mid-stream and the model stopped later."""
    if not done.cancelled() and done.exception() is None:
        used = done.result()
        record_usage(request, used.prompt_tokens, used.completion_tokens)


async def _generate(request: web.Request, parsed: ParsedGeneration, chat: bool) -> web.StreamResponse:
    served = await served_for(request, parsed.model, Capability.CHAT if chat else Capability.COMPLETION)
    job = served.generate(parsed.request)
    job.future.add_done_callback(lambda done: count_usage(request, done))
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    try:
        if parsed.stream:
            return await _stream(request, served, job, parsed, chat, ident, created)
        pieces: list[str] = []
        logprobs: list[TokenLogprob] = []
        async for item in _items(job):
            if isinstance(item, TextDelta):
                pieces.append(item.text)
            else:
                logprobs.append(item)
        text = "".join(pieces)
        result = job.future.result()
    finally:
        job.cancel()  # no-op when finished; stops generation when this handler was cancelled
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason(job, result), "logprobs": None}
    if parsed.request.logprobs is not None:
        choice["logprobs"] = chat_logprobs(logprobs) if chat else completion_logprobs(logprobs)
    if chat:
        content, calls = read_answer(text, served.info.tool_format) if parsed.tools else (text, [])
        choice["message"] = {"role": "assistant", "content": content}
        if calls:
            choice["message"]["tool_calls"] = calls
            choice["finish_reason"] = "tool_calls"
    else:
        choice["text"] = text
    return json_response(
        {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": served.name,
            "system_fingerprint": f"edgefleet-{served.version}",
            "choices": [choice],
            "usage": _usage(result),
        }
    )


async def _stream(
    request: web.Request,
    served: ServedModel,
    job: Job[GenerationResult],
    parsed: ParsedGeneration,
    chat: bool,
    ident: str,
    created: int,
) -> web.StreamResponse:
    batches = _item_batches(job)
    # Wait for the first piece (or the error) before committing to a 200 stream. An answer in
    # the tool format is read whole first: whether it is a call or text shows at its end.
    pending: list[TextDelta | TokenLogprob] = []
    async for items in batches:
        pending += items
        if not parsed.tools:
            break
    header = {
        "id": ident,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": served.name,
        "system_fingerprint": f"edgefleet-{served.version}",
    }

    offset = 0  # characters streamed so far (text_offset of legacy logprobs)

    def chunk(text: str | None, finish: str | None = None, role: bool = False,
              logprobs: list[TokenLogprob] | None = None, delta: dict[str, Any] | None = None) -> str:
        nonlocal offset
        if chat:
            delta = delta if delta is not None else {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice["logprobs"] = None
        if logprobs:
            choice["logprobs"] = chat_logprobs(logprobs) if chat else completion_logprobs(logprobs, offset)
        offset += len(text or "")
        choice["finish_reason"] = finish
        return dumps({**header, "choices": [choice]})

    tokens: list[TokenLogprob] = []  # log probabilities not sent yet: they go with the next text

    def events(items: list[TextDelta | TokenLogprob]) -> list[str]:
        """One chunk per text delta, as OpenAI streams them (each token its own event)."""
        out = []
        for item in items:
            if isinstance(item, TokenLogprob):
                tokens.append(item)
                continue
            out.append(chunk(item.text, logprobs=tokens[:]))
            tokens.clear()
        return out

    response: web.StreamResponse | None = None
    # How long a send may wait for a client that reads nothing (aiohttp-sse then aborts the
    # connection and raises TimeoutError; on Linux it also sets the socket's TCP_USER_TIMEOUT,
    # so the kernel ends a connection whose window stays shut that long).
    timeout_s = request.app[LIVE].config.server.write_timeout_s
    try:
        async with sse_response(request, sep="\n", allow_all_methods=True, send_timeout=timeout_s,
                                headers={"X-Accel-Buffering": "no"}, response_cls=EventStream) as sse:
            response = sse
            opening = [chunk("", role=True)] if chat else []
            result: GenerationResult | None = None
            try:
                if parsed.tools:
                    await sse.send_all(opening)
                    finish = await _send_tool_answer(sse, chunk, pending, job, served.info.tool_format)
                else:
                    # one write per engine step: the tokens it gave this stream, one event each
                    await sse.send_all(opening + events(pending))
                    async for items in batches:
                        await sse.send_all(events(items))
                    finish = finish_reason(job, job.future.result())
                result = job.future.result()
            except ShuttingDownError:  # the model did not stop by the deadline: end the stream anyway
                finish = "shutdown"
            ending = [chunk(None if chat else "", finish=finish, logprobs=tokens)]
            if parsed.include_usage and result is not None:
                ending.append(dumps({**header, "choices": [], "usage": _usage(result)}))
            await sse.send_all([*ending, "[DONE]"])
    except ConnectionError:
        # The client left between two chunks; the caller's finally stops the model.
        log.debug("client of %s left mid-stream", ident)
    except TimeoutError:
        # The client read nothing for server.write_timeout_s: ended as if it had left.
        log.info("ended a stream to %s: the client read nothing for %gs (server.write_timeout_s)",
                 request.remote, timeout_s)
    return response if response is not None else web.Response(status=499)


async def _send_tool_answer(sse: Any, chunk: Any, items: list[TextDelta | TokenLogprob],
                            job: Job[GenerationResult], tool_format: str = "generic") -> str:
    """Stream an answer in the model's tool format, read whole (`items`): its calls as
    OpenAI's `delta.tool_calls` pieces, or its text as content. Returns the finish reason."""
    result = job.future.result()
    text = "".join(item.text for item in items if isinstance(item, TextDelta))
    logprobs = [item for item in items if isinstance(item, TokenLogprob)]
    content, calls = read_answer(text, tool_format)
    if calls:
        if content:  # text the model wrote before its calls (a model's own format allows it)
            await sse.send(chunk(content))
        for delta in tool_call_deltas(calls):
            await sse.send(chunk(None, delta=delta))
        return "tool_calls"
    await sse.send(chunk(content or "", logprobs=logprobs))
    return finish_reason(job, result)


async def embeddings(request: web.Request) -> web.Response:
    body = await read_json(request)
    parsed = parse_embedding(body, request.app[LIVE].config.limits.max_embedding_inputs)
    async with keep_alive(request, parsed.model, body):
        return await _embeddings(request, parsed)


async def _embeddings(request: web.Request, parsed: ParsedEmbedding) -> web.Response:
    served = await served_for(request, parsed.model, Capability.EMBEDDING)
    dim = served.info.embedding_dim
    if parsed.dimensions is not None and parsed.dimensions != dim:
        raise bad_request(
            f"The model '{served.name}' gives {dim}-dimensional embeddings; dimensions "
            "cannot change that", param="dimensions",
        )
    result = await served.embed(parsed.texts)
    record_usage(request, result.prompt_tokens, 0)
    data = []
    for i, vector in enumerate(result.vectors):
        embedding: Any = (
            base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
            if parsed.encoding_format == "base64"
            else vector  # float32, written in its shortest exact form by orjson
        )
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return json_response(
        {
            "object": "list",
            "data": data,
            "model": served.name,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }
    )
