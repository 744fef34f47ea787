"""Retry-After says how long the queue really takes to drain, and repeated errors do
not flood the log."""

from __future__ import annotations

import asyncio
import logging
import time

from agent_process import serve
from conftest import CHAT, EMBED
from rawhttp import exchange

from agent.lifecycle.logs import RateLimitFilter

JOB = {"model": CHAT, "prompt": "Count slowly:", "max_tokens": 40, "temperature": 0, "logit_bias": {"2": -100}}


async def test_retry_after_tracks_the_measured_drain_time_of_slow_jobs(make_agent):
    async with make_agent(models=(CHAT,), max_pending=3) as agent:
        for _ in range(2):  # the agent learns how long a job takes
            assert (await agent.post("/v1/completions", json=JOB))[0] == 200
        running = [asyncio.ensure_future(agent.post("/v1/completions", json=JOB)) for _ in range(3)]
        await asyncio.sleep(0.1)
        status, body, headers = await agent.post("/v1/completions", json=JOB)
        refused_at = time.monotonic()
        assert status == 429, body
        await asyncio.gather(*running)
        drained = time.monotonic() - refused_at
        retry_after = int(headers["Retry-After"])
        print(f"Retry-After {retry_after}s, queue drained in {drained:.2f}s")
        assert drained / 2.5 - 1 <= retry_after <= drained * 2.5 + 1


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
