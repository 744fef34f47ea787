"""The per-model queue: order, bound, cancellation and draining."""

from __future__ import annotations

import asyncio
import threading

import pytest

from runtime.errors import OverloadedError, ShuttingDownError
from runtime.scheduling.scheduler import ModelScheduler


async def test_jobs_run_one_at_a_time_in_arrival_order_on_the_model_thread():
    scheduler = ModelScheduler("m", max_pending=8)
    order, threads = [], set()

    def work(i):
        def run(ctx):
            order.append(i)
            threads.add(threading.current_thread().name)
            return i * 2
        return run

    results = await asyncio.gather(*(scheduler.run(work(i)) for i in range(5)))
    assert results == [0, 2, 4, 6, 8] and order == [0, 1, 2, 3, 4]
    assert threads == {"model:m"}
    await scheduler.close()


async def test_a_job_cancelled_while_queued_never_runs():
    scheduler = ModelScheduler("m", max_pending=8)
    gate = threading.Event()
    ran = []
    first = scheduler.submit(lambda ctx: gate.wait(5) and ran.append("first"))
    second = scheduler.submit(lambda ctx: ran.append("second"))
    second.cancel()
    gate.set()
    await first.result()
    with pytest.raises(asyncio.CancelledError):
        await second.result()
    assert ran == ["first"]
    assert scheduler.stats.cancelled == 1 and scheduler.stats.completed == 1
    await scheduler.close()


async def test_full_queue_refuses_with_a_retry_estimate_and_errors_reach_the_caller():
    scheduler = ModelScheduler("m", max_pending=1)
    gate = threading.Event()
    running = scheduler.submit(lambda ctx: gate.wait(5))
    with pytest.raises(OverloadedError) as refused:
        scheduler.submit(lambda ctx: None)
    assert refused.value.retry_after_s >= 1
    gate.set()
    await running.result()

    def fail(ctx):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await scheduler.run(fail)
    assert scheduler.stats.failed == 1 and scheduler.stats.rejected == 1
    await scheduler.close()


async def test_close_finishes_admitted_work_then_refuses_new():
    scheduler = ModelScheduler("m", max_pending=4)
    job = scheduler.submit(lambda ctx: (asyncio.run(asyncio.sleep(0.2)), "done")[1])
    await scheduler.close(drain_timeout_s=5)
    assert await job.result() == "done"
    with pytest.raises(ShuttingDownError):
        scheduler.submit(lambda ctx: None)


async def test_streamed_items_arrive_in_order_then_the_result():
    scheduler = ModelScheduler("m", max_pending=4)

    def produce(ctx):
        for i in range(200):
            ctx.emit(i)
        return "end"

    job = scheduler.submit(produce)
    assert [i async for i in job.stream()] == list(range(200))
    assert await job.result() == "end"
    await scheduler.close()


async def test_a_settled_job_has_already_left_the_queue():
    """Whoever sees a job finish (a client, a counter) sees a queue without it."""
    scheduler = ModelScheduler("m", max_pending=4)
    for _ in range(50):
        await scheduler.run(lambda ctx: None)
        assert scheduler.depth == 0
    assert scheduler.stats.completed == 50
    await scheduler.close()
