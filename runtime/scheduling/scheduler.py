"""Per-model request queues, each drained by the model's own thread.

Why a thread per model: llama.cpp contexts and our backends are not safe to
call concurrently, and their calls block for seconds; one long-lived thread per
model keeps the event loop free and keeps thread-local state (llama.cpp's
thread pool, onnxruntime's arena) warm. Admission is bounded: past
`max_pending` a request is refused at once with a Retry-After estimate rather
than queued into a latency nobody wants. This worker takes one job at a time;
runtime/scheduling/batch_scheduler.py's subclasses run several at once (continuous
batching for GGUF, dynamic batching for ONNX) without changing how requests
are submitted or cancelled: a job carries its typed request (`Job.request`) so
a batching worker can look inside it.

Every job has a reason to stop early besides its client leaving: the model-time
limit (`ModelLimits.max_model_time_s`, counted from when the model starts on it)
and agent shutdown (`shutdown`). All three raise the same cancel flag, which the
backends check between tokens, prompt chunks and micro-batches; `Job.stop_reason`
says which one it was, so the interface can say why (a finish_reason, a 503).
Retry-After is the time to drain the work admitted, from what that work is, not from how
long recent jobs took (after a run of short chats, that said 2 s while long requests
queued behind them took minutes): a generation's price is its prompt's size and its
max_tokens at the model's measured speeds (`WorkRates`), other work's the measured
average job. A continuous-batching worker measures its decode steps by how many
sequences each decoded, so a token is priced at the speed the model has with as many
running together as are admitted: its slots in parallel, as fast as they really are.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from runtime.backend import GenerationRequest, GenerationResult, JobContext, ModelLimits
from runtime.errors import ModelTimeExceededError, OverloadedError, ShuttingDownError, WorkStopped

log = logging.getLogger(__name__)

T = TypeVar("T")
_DONE = object()

#: Why a job stopped before its work was done (`Job.stop_reason`).
STOP_CLIENT = "client"
STOP_TIME_LIMIT = "time_limit"
STOP_SHUTDOWN = "shutdown"


@dataclass
class SchedulerStats:
    """Counters read by /metrics and telemetry; written only by the loop thread, except
    `executions` and `executed`, which only the model thread writes.

    The registry hands one instance per model name to each version's scheduler, so the
    counts run on across hot swaps and idle unloads (they are Prometheus counters)."""

    admitted: int = 0
    rejected: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    busy_seconds: float = 0.0
    #: Backend runs (a GGUF decode step counts one), and the requests they served together:
    #: executed / executions is the mean batch size (Triton's exec count and inference count).
    executions: int = 0
    executed: int = 0

    def ran(self, requests: int) -> None:
        """One backend run served `requests` requests (model thread)."""
        self.executions += 1
        self.executed += requests


#: Decode steps of each batch width whose times price a token (`WorkRates`).
STEP_WINDOW = 64
#: Prompts shorter than this say nothing of the speed of reading one (the first token,
#: and for a batch the step it joined, take most of their time).
PROMPT_MIN_CHARS = 256


def _average(old: float | None, new: float) -> float:
    """An exponential average in which recent values weigh most."""
    return new if old is None else 0.7 * old + 0.3 * new


def prompt_size(request: GenerationRequest) -> int:
    """A prompt's size in characters (a token-id prompt counts 4 a token), the unit in which
    `WorkRates` measures prompt reading: known before the model tokenizes anything."""
    if request.messages is not None:
        return sum(len(message.content) for message in request.messages)
    if isinstance(request.prompt, list):
        return 4 * len(request.prompt)
    return len(request.prompt or "")


@dataclass
class WorkRates:
    """A model's measured speeds, from which `ModelScheduler.drain_estimate_s` prices the
    work admitted. Prices are in seconds of the model's time: a job that shares the model
    with others (continuous batching) costs its share of each step, not the step.

    Written on the loop thread when a job settles, except the step times, which under
    continuous batching the model thread adds after each step (under `_steps_lock`)."""

    #: Sequences a continuous-batching model decodes together at most; 0: jobs run one at
    #: a time, and the price of a token comes from their own times (`token_s`).
    slots: int = 0
    #: Model seconds per generated token after the first, from jobs that ran alone.
    token_s: float | None = None
    #: Under continuous batching: the last `STEP_WINDOW` decode steps' seconds, by the
    #: sequences each decoded. A token of a batch of n costs the median step of n over n:
    #: the slots working in parallel, at the speed the model had with that many (rarely n
    #: times one's). The median, because one step can take seconds that say nothing of
    #: the next (the first after a model loads, pages read back after an idle spell).
    _steps: dict[int, collections.deque[float]] = field(default_factory=dict, init=False, repr=False)
    _steps_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    #: Seconds per prompt character until a generation's first text: reading the prompt
    #: (measured on prompts of `PROMPT_MIN_CHARS` or more; unknown, prompts cost nothing).
    prompt_char_s: float | None = None
    #: Tokens that generations without a max_tokens produced.
    open_tokens: float | None = None
    #: Seconds of a whole job of any kind: the price of work with no typed request, and of
    #: generations until one has been measured.
    job_s: float | None = None

    def learn(self, job: Job[Any], result: Any, busy: float) -> None:
        """What a finished job (`busy` seconds of model time) says about the model's speed."""
        whole = job.stop_reason is None
        if whole and busy:
            self.job_s = _average(self.job_s, busy)
        request = job.request
        if not (isinstance(request, GenerationRequest) and isinstance(result, GenerationResult)
                and job.started_at is not None and job.first_emit_at is not None):
            return
        reading = max(0.0, job.first_emit_at - job.started_at)
        if prompt_size(request) >= PROMPT_MIN_CHARS:  # a short prompt's time is its first token's
            self.prompt_char_s = _average(self.prompt_char_s, reading / prompt_size(request))
        if not self.slots and result.completion_tokens >= 2:
            self.token_s = _average(self.token_s, max(0.0, busy - reading) / (result.completion_tokens - 1))
        if whole and request.max_tokens is None:
            self.open_tokens = _average(self.open_tokens, result.completion_tokens)

    def learn_step(self, decode_s: float, sequences: int) -> None:
        """One batched decode step: `sequences` tokens in `decode_s` seconds (model thread)."""
        if sequences > 0:
            with self._steps_lock:
                self._steps.setdefault(sequences, collections.deque(maxlen=STEP_WINDOW)).append(decode_s)

    def token_price_s(self, width: int) -> float | None:
        """Model seconds per generated token while `width` sequences run together (None:
        not measured yet): under continuous batching from the steps of the width measured
        nearest to it, else from jobs."""
        if not self.slots:
            return self.token_s
        with self._steps_lock:
            if not self._steps:
                return None
            nearest = min(self._steps, key=lambda n: (abs(n - width), -n))
            steps = list(self._steps[nearest])
        import statistics  # here: with decimal and fractions, 0.5 MiB an idle agent does not need

        return statistics.median(steps) / nearest

    def price_s(self, request: Any, limits: ModelLimits, width: int = 1) -> float:
        """Model seconds a job serving `request` is expected to take while `width` jobs run
        together (at most the model-time limit): a generation's prompt and max_tokens at the
        measured rates, other work the average job."""
        token_s = self.token_price_s(width) if isinstance(request, GenerationRequest) else None
        if isinstance(request, GenerationRequest) and token_s is not None:
            tokens = request.max_tokens if request.max_tokens is not None else (self.open_tokens or 1.0)
            price = (self.prompt_char_s or 0.0) * prompt_size(request) + tokens * token_s
        else:
            price = self.job_s if self.job_s is not None else 1.0
        return min(price, limits.max_model_time_s)


class Job(Generic[T]):
    """One request in a model's queue: its work, its stream of events, its result."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, work: Callable[[JobContext], T], limits: ModelLimits | None = None,
        request: Any = None,
    ) -> None:
        self._loop = loop
        self._work = work
        #: The typed request (GenerationRequest, EmbedRequest, ...) the work serves, when a
        #: batching worker may run it together with others; None for opaque work.
        self.request = request
        self.limits = limits or ModelLimits()
        #: None while the job may run on; else STOP_CLIENT, STOP_TIME_LIMIT or STOP_SHUTDOWN.
        self.stop_reason: str | None = None
        self._deadline: float | None = None
        self._cancel = threading.Event()
        self._events: collections.deque[Any] = collections.deque()
        self._wakeup: asyncio.Event = asyncio.Event()
        self._wakeup_pending = False
        #: Set by a batching worker before the job runs: `emit` leaves waking the loop to the
        #: worker, which wakes every stream a step fed with one call (`fresh_jobs`, `wake`).
        self.woken_by_step = False
        self._unannounced = False
        self.future: asyncio.Future[T] = loop.create_future()
        self.enqueued_at = time.monotonic()
        self.started_at: float | None = None
        #: When the work emitted its first item (time.monotonic(); the model thread sets it).
        self.first_emit_at: float | None = None

    # JobContext, called from the model thread
    def cancelled(self) -> bool:
        if self._cancel.is_set():
            return True
        if self._deadline is not None and time.monotonic() > self._deadline:
            self.stop(STOP_TIME_LIMIT)
            return True
        return False

    def emit(self, item: Any) -> None:
        # deque.append is atomic; wake the loop only if no wake-up is already on its way,
        # so a loop that falls behind drains several items per wake-up.
        if self.first_emit_at is None:
            self.first_emit_at = time.monotonic()
        self._events.append(item)
        if self.woken_by_step:
            self._unannounced = True
        elif not self._wakeup_pending:
            self._wakeup_pending = True
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._wakeup_pending = False
        self._wakeup.set()

    def stop(self, reason: str) -> None:
        """Ask the work to stop at its next check; the first reason given is kept."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self._cancel.set()

    # the coroutine's side
    def cancel(self) -> None:
        """Ask the work to stop at its next check (the client went away); a no-op once done."""
        if not self.future.done():
            self.stop(STOP_CLIENT)
        self._cancel.set()

    async def stream(self) -> AsyncIterator[Any]:
        """Items emitted by the work as they come; raises the work's error at the end."""
        while True:
            while not self._events:
                self._wakeup.clear()
                await self._wakeup.wait()
            item = self._events.popleft()
            if item is _DONE:
                break
            yield item
        self.future.result()

    async def batches(self) -> AsyncIterator[list[Any]]:
        """Like `stream`, but every item already emitted at once (what one engine step gave,
        or several when the loop fell behind), so a writer sends them in one write."""
        while True:
            while not self._events:
                self._wakeup.clear()
                await self._wakeup.wait()
            items: list[Any] = []
            while self._events:
                item = self._events.popleft()
                if item is _DONE:
                    if items:
                        yield items
                    self.future.result()
                    return
                items.append(item)
            yield items

    async def result(self) -> T:
        return await asyncio.shield(self.future)

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        if not self.future.done():
            if error is not None:
                self.future.set_exception(error)
                self.future.exception()  # a caller that left must not log "never retrieved"
            else:
                self.future.set_result(result)
        self._events.append(_DONE)
        self._wakeup.set()


def fresh_jobs(jobs: list[Job[Any]]) -> list[Job[Any]]:
    """Of `jobs` (woken by step, called on the model thread), those that emitted items since
    the last call; each is then counted as told."""
    fresh = [job for job in jobs if job._unannounced]
    for job in fresh:
        job._unannounced = False
    return fresh


def wake(jobs: list[Job[Any]]) -> None:
    """On the loop: wake the streams of `jobs` (one call for a whole step's streams)."""
    for job in jobs:
        job._wake()


class ModelScheduler:
    """Queue and worker thread of one loaded model."""

    def __init__(
        self, name: str, max_pending: int, thread_name: str | None = None, limits: ModelLimits | None = None,
        stats: SchedulerStats | None = None,
    ) -> None:
        self.name = name
        self.max_pending = max_pending
        self.limits = limits or ModelLimits()
        self.stats = stats if stats is not None else SchedulerStats()
        self._pending: collections.deque[Job[Any]] = collections.deque()
        #: Jobs the model thread is working on (one here; several in a batching subclass).
        self._running: list[Job[Any]] = []
        #: time.monotonic() since when at least one job has been running (None: idle).
        self._busy_since: float | None = None
        self._cv = threading.Condition()
        self._closing = False
        self._shutdown_at: float | None = None
        #: The model's measured speeds, for Retry-After (`drain_estimate_s`).
        self.rates = WorkRates()
        self._thread = threading.Thread(
            target=self._worker, name=thread_name or f"model:{name}", daemon=True
        )
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests admitted and not finished: queued plus running."""
        with self._cv:
            return len(self._pending) + len(self._running)

    def occupancy(self) -> tuple[int, int]:
        """(running, waiting): requests the model works on now, and admitted ones queued."""
        with self._cv:
            return len(self._running), len(self._pending)

    def kv_cache_usage(self) -> float | None:
        """Share of the model's KV cache cells in use (0-1); None for a model without one."""
        return None

    def running_for_s(self) -> float:
        """How long the model thread has been busy without a break (0 when idle): busy time not
        yet in `stats.busy_seconds`, for energy attribution over windows shorter than a job.
        Wall time, not a sum over jobs: a batch of eight running for a second is one busy second."""
        started = self._busy_since
        return 0.0 if started is None else max(0.0, time.monotonic() - started)

    def drain_estimate_s(self) -> float:
        """Seconds until the jobs admitted now are done: the price of each queued job
        (`WorkRates.price_s`), plus what is left of the running ones' (at least a tenth).
        Under continuous batching the jobs are priced at the width they will run at (all
        admitted, up to the slots), each running one has used its share of the time since
        it began, and what is left of each adds up; otherwise the running jobs are one run
        (one job, or one ONNX batch) and what is left is the longest one's."""
        with self._cv:
            queued = [job.request for job in self._pending]
            running = [(job.request, job.started_at) for job in self._running]
        rates = self.rates
        width = min(rates.slots, len(queued) + len(running)) if rates.slots else 1
        share = len(running) if rates.slots else 1
        now = time.monotonic()
        left = []
        for request, started in running:
            price = rates.price_s(request, self.limits, width)
            left.append(max(price - (now - (started or now)) / share, 0.1 * price))
        running_s = sum(left) if rates.slots else max(left, default=0.0)
        return running_s + sum(rates.price_s(request, self.limits, width) for request in queued)

    def retry_after_s(self) -> int:
        """A Retry-After for a refused request: the measured drain time, 1 to 600 s."""
        if self._shutdown_at is not None:
            return self.shutdown_retry_after_s()
        return int(min(600, max(1, math.ceil(self.drain_estimate_s()))))

    def shutdown_retry_after_s(self) -> int:
        """While shutting down: until the agent has stopped, plus a few seconds for a
        service manager to start it again."""
        left = (self._shutdown_at or time.monotonic()) - time.monotonic()
        return int(max(1, math.ceil(left)) + 5)

    def submit(self, work: Callable[[JobContext], T], request: Any = None) -> Job[T]:
        """Admit `work` or refuse it now; called on the event loop. `request` is the typed
        request `work` serves, for workers that batch (they may run it without `work`)."""
        if self._closing:
            raise ShuttingDownError(self.name, self.shutdown_retry_after_s())
        job: Job[T] = Job(asyncio.get_running_loop(), work, self.limits, request)
        with self._cv:
            depth = len(self._pending) + len(self._running)
            if depth >= self.max_pending:
                self.stats.rejected += 1
                raise OverloadedError(self.name, depth, self.retry_after_s())
            self._pending.append(job)
            self.stats.admitted += 1
            self._cv.notify()
        return job

    async def run(self, work: Callable[[JobContext], T]) -> T:
        """Submit and wait; if the caller is cancelled the work is told to stop."""
        job = self.submit(work)
        try:
            return await job.result()
        finally:
            job.cancel()

    def _take(self) -> Job[Any] | None:
        with self._cv:
            while not self._pending and not self._closing:
                self._cv.wait()
            if not self._pending:
                return None
            job = self._pending.popleft()
            self._start_running(job)
            return job

    def _start_running(self, job: Job[Any]) -> None:
        """Move `job` to the running set (under the lock)."""
        if not self._running:
            self._busy_since = time.monotonic()
        self._running.append(job)

    def _stop_running(self, job: Job[Any]) -> float:
        """Take `job` out of the running set (under the lock); returns the busy seconds that
        ended with it (the busy period's length when nothing else runs, else 0)."""
        self._running.remove(job)
        self._cv.notify_all()
        if self._running or self._busy_since is None:
            return 0.0
        busy, self._busy_since = time.monotonic() - self._busy_since, None
        return busy

    def _worker(self) -> None:
        while (job := self._take()) is not None:
            result, error, busy = self._execute(job)
            self.stats.ran(1)
            # Leave the running set before the loop learns the outcome, so whoever sees
            # the job settled (a counter, a waiting client) also sees the queue without it.
            with self._cv:
                period = self._stop_running(job)
            self._report(job, result, error, busy, period)

    def _report(self, job: Job[Any], result: Any, error: BaseException | None, busy: float,
                period: float) -> None:
        """Hand a finished job to the loop: `busy` is the job's own model time (Retry-After's
        average), `period` the busy wall time that ended with it (energy attribution)."""
        job._loop.call_soon_threadsafe(self._settle, job, result, error, busy, period)

    def _execute(self, job: Job[Any]) -> tuple[Any, BaseException | None, float]:
        """Run one job on this thread: (result, error, seconds busy)."""
        if job.cancelled():
            return None, self._stopped_error(job), 0.0
        started = job.started_at = time.monotonic()
        job._deadline = started + job.limits.max_model_time_s
        try:
            result = job._work(job)
        except WorkStopped:
            return None, self._stopped_error(job), time.monotonic() - started
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting coroutine, never lost
            return None, exc, time.monotonic() - started
        finally:
            job._deadline = None  # the limit is on model time: none passes once it is done
        return result, None, time.monotonic() - started

    def _stopped_error(self, job: Job[Any]) -> BaseException:
        """The error for a job stopped before it had anything to return: says why."""
        if job.stop_reason == STOP_TIME_LIMIT:
            return ModelTimeExceededError(job.limits.max_model_time_s)
        if job.stop_reason == STOP_SHUTDOWN:
            return ShuttingDownError(self.name, self.shutdown_retry_after_s())
        return asyncio.CancelledError()

    def _settle(self, job: Job[Any], result: Any, error: BaseException | None, busy: float,
                period: float) -> None:
        stats = self.stats
        stats.busy_seconds += period
        self.rates.learn(job, result, busy)
        if job.stop_reason is not None or job._cancel.is_set():
            stats.cancelled += 1
        elif error is not None:
            stats.failed += 1
        else:
            stats.completed += 1
        job._finish(result, error)

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new work, let admitted work finish (up to the timeout), stop the thread."""
        self._closing = True
        deadline = time.monotonic() + (0.0 if self._shutdown_at is not None else drain_timeout_s)
        while self.depth and time.monotonic() < deadline:  # after `shutdown`, no second drain
            await asyncio.sleep(0.05)
        with self._cv:
            for job in self._pending:
                job.cancel()
            for job in self._running:
                job.cancel()
            self._cv.notify_all()
        await asyncio.to_thread(self._thread.join)

    async def shutdown(self, deadline: float, grace_s: float = 2.0) -> None:
        """Agent shutdown, by `deadline` (a time.monotonic() value): refuse new work, answer
        every queued job now with ShuttingDownError (503 + Retry-After), let the running
        job go on until the deadline, then stop it with reason STOP_SHUTDOWN (a stream
        then ends with finish_reason "shutdown"). Returns once nothing runs."""
        self._closing = True
        self._shutdown_at = deadline
        with self._cv:
            queued = list(self._pending)
            self._pending.clear()
        for job in queued:
            job.stop(STOP_SHUTDOWN)
            self.stats.cancelled += 1
            job._finish(error=ShuttingDownError(self.name, self.shutdown_retry_after_s()))
        while self.depth and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        with self._cv:
            running = list(self._running)
        if running:
            log.warning("model %s: stopping %d request(s) still running at the drain deadline",
                        self.name, len(running))
        for job in running:
            job.stop(STOP_SHUTDOWN)
        stop_by = time.monotonic() + grace_s  # backends check between tokens, chunks, batches
        while self.depth and time.monotonic() < stop_by:
            await asyncio.sleep(0.01)
        with self._cv:
            running = list(self._running)
        for job in running:
            if job.future.done():
                continue
            # A native call longer than the grace (one token can take seconds on a CPU that
            # other processes keep busy): answer its client now; the thread ends with the call.
            log.warning("model %s: a request did not stop within %.1fs; answering its client without it",
                        self.name, grace_s)
            job._finish(error=ShuttingDownError(self.name, self.shutdown_retry_after_s()))
