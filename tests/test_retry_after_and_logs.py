"""Retry-After says how long the work queued takes at the model's measured speed, and
repeated errors do not flood the log."""

from __future__ import annotations

import asyncio
import io
import logging
import time

from agent_process import serve
from conftest import CHAT, EMBED
from rawhttp import exchange

from agent.lifecycle.logs import LogfmtFormatter, RateLimitFilter

JOB = {"model": CHAT, "prompt": "Count slowly:", "max_tokens": 40, "temperature": 0, "logit_bias": {"2": -100}}


async def client_speed(agent, requests: int) -> float:
    """Run `requests` of JOB one after the other: seconds per generated token as the client
    saw them (the model's speed now, plus a little for HTTP and the prompt)."""
    started, tokens = time.monotonic(), 0
    for _ in range(requests):
        status, body, _ = await agent.post("/v1/completions", json=JOB)
        assert status == 200, body
        tokens += body["usage"]["completion_tokens"]
    return (time.monotonic() - started) / tokens


async def refused_when_full(agent, body: dict, queue: int) -> tuple[int, float]:
    """Fill the model's queue (`queue` requests of `body`), then send one more: its Retry-After,
    and how long the queue then took to drain."""
    admitted = [asyncio.ensure_future(agent.post("/v1/completions", json=body)) for _ in range(queue)]
    while await agent.metric("edgefleet_queue_depth", model=CHAT) < queue:
        await asyncio.sleep(0.05)
    status, refusal, headers = await agent.post("/v1/completions", json=body)
    refused_at = time.monotonic()
    assert status == 429, refusal
    assert all(status == 200 for status, _, _ in await asyncio.gather(*admitted))
    return int(headers["Retry-After"]), time.monotonic() - refused_at


# Retry-After is checked against the speed the client saw just before, not against the drain
# that follows: another process on the same two CPUs can make the model several times slower
# or faster between the two (the drain time is printed). The bounds: at most the queued work
# one request at a time; at least a quarter of it (the slots in parallel).


async def test_retry_after_is_the_queued_work_at_the_measured_speed(make_agent):
    async with make_agent(models=(CHAT,), max_pending=3) as agent:
        token_s = await client_speed(agent, 2)
        retry_after, drained = await refused_when_full(agent, JOB, 3)
        work_s = 3 * JOB["max_tokens"] * token_s
        print(f"Retry-After {retry_after}s for 3 x 40 tokens at {token_s * 1000:.1f} ms a token "
              f"({work_s:.1f}s one at a time); the queue drained in {drained:.2f}s")
        assert work_s / 4 - 1 <= retry_after <= work_s + 2


async def test_retry_after_counts_the_long_work_queued_after_a_run_of_short_chats(make_agent):
    """Short requests teach the agent nothing about how long the queue takes now: Retry-After
    comes from the work admitted, each request's max_tokens at the measured time per token.
    With six 400-token requests queued after a run of 40-token ones it is about 2400 tokens at
    the speed those showed; it used to be the short ones' average time, a second or two."""
    async with make_agent(models=(CHAT,), max_pending=6) as agent:
        token_s = await client_speed(agent, 4)
        retry_after, drained = await refused_when_full(agent, {**JOB, "max_tokens": 400}, 6)
        work_s = 6 * 400 * token_s
        print(f"Retry-After {retry_after}s for 6 x 400 tokens at {token_s * 1000:.1f} ms a token "
              f"({work_s:.0f}s one at a time); the queue drained in {drained:.1f}s")
        assert work_s / 4 - 1 <= retry_after <= min(600, work_s) + 2


async def test_retry_after_of_a_fast_queue_is_short(make_agent):
    async with make_agent(models=(EMBED,), max_pending=4) as agent:
        body = {"model": EMBED, "input": ["a short sentence"] * 4}
        assert (await agent.post("/v1/embeddings", json=body))[0] == 200
        results = await asyncio.gather(*(agent.post("/v1/embeddings", json=body) for _ in range(30)))
        refused = [int(headers["Retry-After"]) for status, _, headers in results if status == 429]
        assert refused, "the queue never filled"
        assert max(refused) == 1, refused


async def test_repeated_errors_are_logged_a_few_times_not_each_time(state_dir, tmp_path):
    with serve(state_dir, tmp_path, server__max_connections=5) as agent:
        held = [await asyncio.open_connection("127.0.0.1", agent.port) for _ in range(5)]
        for _ in range(200):  # each refused with a 503
            response = await exchange(agent.port, b"")
            assert response is not None and response.status == 503
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.3)
        for _ in range(200):
            response = await exchange(agent.port, b"BR{}KEN / HTTP/1.1\r\n\r\n")
            assert response is not None and response.status == 400
        code, _ = agent.terminate()
    log = agent.log()
    assert code == 0
    assert 1 <= log.count("refused a connection") <= 10, log[-2000:]
    assert 1 <= log.count("bad HTTP request") <= 10, log[-2000:]
    assert "Traceback" not in log


def test_a_suppressed_burst_is_counted_on_the_next_line():
    limiter = RateLimitFilter(burst=3, interval_s=0.2)
    record = lambda: logging.LogRecord("x", logging.WARNING, __file__, 1, "refused %d", (1,), None)  # noqa: E731
    passed = [limiter.filter(record()) for _ in range(50)]
    assert passed.count(True) == 3
    time.sleep(0.25)
    later = record()
    assert limiter.filter(later) and "47 similar messages suppressed" in later.getMessage()


def test_a_flood_of_one_refusal_does_not_hide_the_first_of_another():
    """The limiter keys on what a line says, not on its template: ten `update refused` lines
    of one code in a minute must not swallow the first refusal of another code or model."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogfmtFormatter())
    handler.addFilter(RateLimitFilter(burst=10, interval_s=60.0))
    logger = logging.getLogger("test.refusals")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for _ in range(30):  # a broken hub, polled again and again
            logger.error("update refused (%s): %s", "signature", "timestamp not signed by a threshold")
        logger.error("update refused (%s): %s", "expired", "timestamp expired")
        logger.error("update %s %s %s: %s (%s)", "chat", "2", "failed", "sha256 differs", "hash-mismatch")
        logger.error("update %s %s %s: %s (%s)", "embed", "7", "failed", "sha256 differs", "hash-mismatch")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert sum("(signature)" in line for line in lines) == 10  # the flood itself is still capped
    assert sum("(expired)" in line for line in lines) == 1, lines[-3:]
    assert sum("update chat 2 failed" in line for line in lines) == 1
    assert sum("update embed 7 failed" in line for line in lines) == 1


def test_varying_the_arguments_does_not_get_past_the_limit():
    """Arguments can come from outside (a forged doorbell's serial): each format string
    still has a ceiling per interval."""
    limiter = RateLimitFilter(burst=10, interval_s=60.0)
    passed = [
        limiter.filter(logging.LogRecord("x", logging.ERROR, __file__, 1, "doorbell serial %d refused", (i,), None))
        for i in range(1000)
    ]
    assert passed[:100] == [True] * 100 and passed.count(True) == 100
