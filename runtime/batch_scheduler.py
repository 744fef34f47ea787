"""Model threads that run several requests at once.

`ContinuousBatchScheduler` drives a GGUF model's `BatchEngine`: between two steps
it moves queued generations into free slots, and every finished or cancelled one
leaves at the next step. `EmbeddingBatchScheduler` is Triton's dynamic batcher for
an ONNX embedding model: it takes the queued embedding requests (up to
`onnx_max_batch`, waiting at most `onnx_max_delay_ms` for more), embeds all their
texts in one backend call (texts sorted by length and padded per micro-batch within
the memory budget) and gives each request its own rows back by position.

Both keep the base scheduler's contract: bounded admission, Retry-After, stop
reasons, shutdown, per-job settle on the loop. Work that is not batchable (another
kind of request on the same model) runs alone between steps.
"""

from __future__ import annotations

import time
from typing import Any

from .backend import Backend, Capability, EmbeddingResult, EmbedRequest, GenerationRequest, ModelLimits
from .batching import BatchingSettings
from .errors import WorkStopped
from .gguf_batch import BatchEngine
from .scheduler import Job, ModelScheduler, SchedulerStats


def scheduler_for(name: str, backend: Backend, settings: BatchingSettings, max_pending: int,
                  limits: ModelLimits, stats: SchedulerStats) -> ModelScheduler:
    """The scheduler a loaded model gets: batching where its backend and the settings allow."""
    engine = getattr(backend, "engine", None)
    if isinstance(engine, BatchEngine):
        return ContinuousBatchScheduler(name, max_pending, engine, limits=limits, stats=stats)
    if Capability.EMBEDDING in backend.info.capabilities and settings.onnx_max_batch > 1:
        return EmbeddingBatchScheduler(name, max_pending, backend, settings.onnx_max_batch,
                                       settings.onnx_max_delay_ms / 1000, limits=limits, stats=stats)
    return ModelScheduler(name, max_pending, limits=limits, stats=stats)


class _BatchingScheduler(ModelScheduler):
    """What both batching workers share: starting, running alone and ending a job."""

    def _begin(self, job: Job[Any]) -> bool:
        """Start `job`'s model time; False (and the job answered) when it was cancelled
        while queued."""
        if job.cancelled():
            self._end(job, None, self._stopped_error(job))
            return False
        job.started_at = time.monotonic()
        job._deadline = job.started_at + job.limits.max_model_time_s
        return True

    def _run_alone(self, job: Job[Any]) -> None:
        try:
            result = job._work(job)
        except WorkStopped:
            self._end(job, None, self._stopped_error(job))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting coroutine
            self._end(job, None, exc)
        else:
            self._end(job, result, None)

    def _end(self, job: Job[Any], result: Any, error: BaseException | None) -> None:
        if isinstance(error, WorkStopped):
            error = self._stopped_error(job)
        job._deadline = None  # the limit is on model time: none passes once it is done
        busy = time.monotonic() - job.started_at if job.started_at is not None else 0.0
        with self._cv:
            period = self._stop_running(job)
        self._report(job, result, error, busy, period)


class ContinuousBatchScheduler(_BatchingScheduler):
    """A GGUF model's thread, stepping every running generation together."""

    def __init__(self, name: str, max_pending: int, engine: BatchEngine, limits: ModelLimits | None = None,
                 stats: SchedulerStats | None = None) -> None:
        self._engine = engine  # before the thread starts
        super().__init__(name, max_pending, limits=limits, stats=stats)
        self.parallel = engine.slots

    def _worker(self) -> None:
        engine = self._engine
        while True:
            with self._cv:
                while not self._pending and not engine.active and not self._closing:
                    self._cv.wait()
                if not self._pending and not engine.active:
                    return  # closing, nothing left
                newcomers: list[Job[Any]] = []
                while self._pending and len(newcomers) < engine.free_slots():
                    job = self._pending.popleft()
                    self._start_running(job)
                    newcomers.append(job)
            for job in newcomers:
                if not self._begin(job):
                    continue
                if not isinstance(job.request, GenerationRequest):
                    self._run_alone(job)
                    continue
                try:
                    engine.add(job.request, job)
                except BaseException as exc:  # noqa: BLE001 - the request's own error (400, 413, ...)
                    self._end(job, None, exc)
            for ctx, result, error in engine.step():
                assert isinstance(ctx, Job)  # the engine's contexts are the jobs added above
                self._end(ctx, result, error)


class EmbeddingBatchScheduler(_BatchingScheduler):
    """An embedding model's thread, running queued embedding requests as one batch."""

    def __init__(self, name: str, max_pending: int, backend: Backend, max_batch: int, max_delay_s: float,
                 limits: ModelLimits | None = None, stats: SchedulerStats | None = None) -> None:
        self._backend = backend
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        super().__init__(name, max_pending, limits=limits, stats=stats)

    def _gather(self) -> list[Job[Any]]:
        """The next batch: the first queued job, plus queued embedding requests behind it
        (same `normalize`), waiting up to max_delay_s for the batch to fill."""
        with self._cv:
            while not self._pending and not self._closing:
                self._cv.wait()
            if not self._pending:
                return []
            first = self._pending.popleft()
            self._start_running(first)
            batch = [first]
            if not isinstance(first.request, EmbedRequest):
                return batch
            deadline = time.monotonic() + self.max_delay_s
            while len(batch) < self.max_batch:
                same = next((j for j in self._pending if isinstance(j.request, EmbedRequest)
                             and j.request.normalize == first.request.normalize), None)
                if same is not None:
                    self._pending.remove(same)
                    self._start_running(same)
                    batch.append(same)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closing:
                    break
                self._cv.wait(left)
            return batch

    def _worker(self) -> None:
        while batch := self._gather():
            batch = [job for job in batch if self._begin(job)]
            if len(batch) == 1 or (batch and not isinstance(batch[0].request, EmbedRequest)):
                for job in batch:
                    self._run_alone(job)
            elif batch:
                self._run_batch(batch)

    def _run_batch(self, jobs: list[Job[Any]]) -> None:
        texts = [text for job in jobs for text in job.request.texts]
        try:
            combined = self._backend.embed(texts, jobs[0].request.normalize, _AllOf(jobs))
        except WorkStopped:
            for job in jobs:  # every client left; answer each with its own reason
                self._end(job, None, self._stopped_error(job))
            return
        except BaseException:  # noqa: BLE001 - find whose input it was: each runs alone
            for job in jobs:
                self._run_alone(job)
            return
        start = 0
        for job in jobs:
            n = len(job.request.texts)
            tokens = combined.input_tokens[start:start + n]
            self._end(job, EmbeddingResult(vectors=combined.vectors[start:start + n].copy(),
                                           prompt_tokens=sum(tokens), input_tokens=tokens), None)
            start += n


class _AllOf:
    """The JobContext of a batch run: it stops only when every request in it has stopped,
    and works within the first request's limits (every job of a model has the same)."""

    def __init__(self, jobs: list[Job[Any]]) -> None:
        self._jobs = jobs
        self.limits = jobs[0].limits

    def cancelled(self) -> bool:
        return all(job.cancelled() for job in self._jobs)

    def emit(self, item: Any) -> None:
        pass
