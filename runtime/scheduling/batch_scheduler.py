"""Model threads that run several requests at once.

`ContinuousBatchScheduler` drives a GGUF model's `BatchEngine`: between two steps
it moves queued generations into free slots, and every finished or cancelled one
leaves at the next step. `OnnxBatchScheduler` is Triton's dynamic batcher for an
ONNX model: it takes the queued requests of one kind (up to `onnx_max_batch`, waiting
at most `onnx_max_delay_ms` for more) and runs them in one backend call: embedding
requests' texts together (sorted by length and padded per micro-batch within the
memory budget), tensor requests of one signature stacked along the first dimension;
each request gets its own rows back by position. If the combined run fails, each
request runs alone, so a bad input gets its own error and nobody else's.

Both keep the base scheduler's contract: bounded admission, Retry-After, stop
reasons, shutdown, per-job settle on the loop. Work that is not batchable (another
kind of request on the same model) runs alone between steps.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from runtime.backend import (
    Backend,
    Capability,
    EmbeddingResult,
    EmbedRequest,
    GenerationRequest,
    InferRequest,
    ModelLimits,
)
from runtime.errors import WorkStopped
from runtime.scheduling.batching import BatchingSettings
from runtime.scheduling.scheduler import Job, ModelScheduler, SchedulerStats, fresh_jobs, wake

if TYPE_CHECKING:
    import numpy as np

    from runtime.gguf.gguf_batch import BatchEngine  # imported by the GGUF backend: an agent without one never loads it

log = logging.getLogger(__name__)

#: False only to measure the old way (bench/bench_load.py's A/B): every stream wakes the loop
#: on its own, once per token.
WAKE_BY_STEP = "wake" not in os.environ.get("EDGEFLEET_BENCH_OLD_PATHS", "").split(",")


def scheduler_for(name: str, backend: Backend, settings: BatchingSettings, max_pending: int,
                  limits: ModelLimits, stats: SchedulerStats) -> ModelScheduler:
    """The scheduler a loaded model gets: batching where its backend and the settings allow."""
    from runtime.gguf.gguf_batch import BatchEngine

    engine = getattr(backend, "engine", None)
    if isinstance(engine, BatchEngine):
        return ContinuousBatchScheduler(name, max_pending, engine, limits=limits, stats=stats)
    onnx = Capability.EMBEDDING in backend.info.capabilities or Capability.TENSOR in backend.info.capabilities
    if onnx and settings.onnx_max_batch > 1:
        return OnnxBatchScheduler(name, max_pending, backend, settings.onnx_max_batch,
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
        self.stats.ran(1)
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
    """A GGUF model's thread, stepping every running generation together.

    The loop hears of a step once: the tokens every stream got and the requests that ended
    go to it in one `call_soon_threadsafe` per step (`_announce`), not one per token per
    stream. Each wake-up is a write to the loop's self-pipe, and the loop's work competes
    with llama.cpp's threads for the same cores."""

    def __init__(self, name: str, max_pending: int, engine: BatchEngine, limits: ModelLimits | None = None,
                 stats: SchedulerStats | None = None) -> None:
        self._engine = engine  # before the thread starts
        #: the ends of a step's requests, handed to the loop with its tokens (None: at once)
        self._step_reports: list[tuple[Job[Any], Any, BaseException | None, float, float]] | None = None
        super().__init__(name, max_pending, limits=limits, stats=stats)
        self.rates.slots = engine.slots  # tokens priced from its steps, by width

    def _report(self, job: Job[Any], result: Any, error: BaseException | None, busy: float,
                period: float) -> None:
        if self._step_reports is None:
            super()._report(job, result, error, busy, period)
        else:
            self._step_reports.append((job, result, error, busy, period))

    def _announce(self, jobs: list[Job[Any]]) -> None:
        """One wake-up of the loop for a step: the streams of `jobs` that got items, then the
        requests that ended (their last items are already queued)."""
        fresh, reports, self._step_reports = fresh_jobs(jobs), self._step_reports or [], None
        if not fresh and not reports:
            return
        loop = (fresh or [report[0] for report in reports])[0]._loop  # every job of an agent has its loop
        loop.call_soon_threadsafe(self._after_step, fresh, reports)

    def _after_step(self, fresh: list[Job[Any]],
                    reports: list[tuple[Job[Any], Any, BaseException | None, float, float]]) -> None:
        wake(fresh)
        for report in reports:
            self._settle(*report)

    def kv_cache_usage(self) -> float | None:
        return self._engine.kv_cache_usage()

    def _worker(self) -> None:
        engine = self._engine
        engine.warm()  # on this thread, before the first request (see BatchEngine.warm)
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
                job.woken_by_step = WAKE_BY_STEP
                try:
                    engine.add(job.request, job)
                except BaseException as exc:  # noqa: BLE001 - the request's own error (400, 413, ...)
                    self._end(job, None, exc)
            with self._cv:
                stepping = list(self._running)
            self._step_reports = []
            decoding = _DecodeTimer(self.stats)
            try:
                finished = engine.step(decoding)
                if decoding.began is not None:  # Retry-After's price of a token
                    self.rates.learn_step(time.monotonic() - decoding.began, decoding.sequences)
            except Exception as exc:  # a bug must fail the batch, not end the thread
                log.exception("model %s: a batch step failed; failing its requests", self.name)
                finished = engine.abort_all(f"the batch failed: {type(exc).__name__}: {exc}")
            for ctx, result, error in finished:
                assert isinstance(ctx, Job)  # the engine's contexts are the jobs added above
                self._end(ctx, result, error)
            self._announce(stepping)


class _DecodeTimer:
    """The `ran` callback of one engine step: counts each decode call (the stats' execution
    counts) and notes when the first began and how many sequences the calls decoded."""

    def __init__(self, stats: SchedulerStats) -> None:
        self._stats = stats
        self.began: float | None = None
        self.sequences = 0

    def __call__(self, sequences: int) -> None:
        if self.began is None:
            self.began = time.monotonic()
        self.sequences += sequences
        self._stats.ran(sequences)


class OnnxBatchScheduler(_BatchingScheduler):
    """An ONNX model's thread, running queued requests of one kind as one batch: embedding
    requests (same `normalize`) and tensor requests of the same signature (input names,
    dtypes and shapes past the first dimension, outputs asked for), the way Triton's
    dynamic batcher stacks requests along the batch dimension."""

    def __init__(self, name: str, max_pending: int, backend: Backend, max_batch: int, max_delay_s: float,
                 limits: ModelLimits | None = None, stats: SchedulerStats | None = None) -> None:
        self._backend = backend
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        super().__init__(name, max_pending, limits=limits, stats=stats)

    def _key(self, request: object) -> Hashable | None:
        """Requests with the same key run together; None: this one runs alone (and a bad one
        then gets its own error from the backend). Never raises: it runs on the model thread
        outside any job, where an exception would end the thread."""
        try:
            return self._batch_key(request)
        except Exception:  # noqa: BLE001 - malformed input is the backend's to report
            return None

    def _batch_key(self, request: object) -> Hashable | None:
        if isinstance(request, EmbedRequest):
            return ("embed", request.normalize)
        if isinstance(request, InferRequest):
            outputs = list(request.outputs) if request.outputs else None
            splits = getattr(self._backend, "splits_along_batch", None)
            if request.rows() and splits is not None and splits(outputs or list(self._output_names())):
                return ("infer", request.signature())
        return None

    def _output_names(self) -> list[str]:
        return [spec.name for spec in self._backend.info.outputs]

    def _gather(self) -> list[Job[Any]]:
        """The next batch: the first queued job, plus queued jobs with its key behind it,
        waiting up to max_delay_s for the batch to fill."""
        with self._cv:
            while not self._pending and not self._closing:
                self._cv.wait()
            if not self._pending:
                return []
            first = self._pending.popleft()
            self._start_running(first)
            batch = [first]
            key = self._key(first.request)
            if key is None:
                return batch
            keys: dict[Job[Any], Hashable | None] = {}

            def key_of(job: Job[Any]) -> Hashable | None:  # each queued job's key, worked out once
                if job not in keys:
                    keys[job] = self._key(job.request)
                return keys[job]

            deadline = time.monotonic() + self.max_delay_s
            while len(batch) < self.max_batch:
                same = next((j for j in self._pending if key_of(j) == key), None)
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
            if len(batch) == 1:
                self._run_alone(batch[0])
            elif batch and isinstance(batch[0].request, EmbedRequest):
                self._run_batch(batch, self._embed_together)
            elif batch:
                self._run_batch(batch, self._infer_together)

    def _run_batch(self, jobs: list[Job[Any]], together: Callable[[list[Job[Any]]], list[Any]]) -> None:
        self.stats.ran(len(jobs))
        try:
            results = together(jobs)
        except WorkStopped:
            for job in jobs:  # every client left; answer each with its own reason
                self._end(job, None, self._stopped_error(job))
            return
        except BaseException:  # noqa: BLE001 - find whose input it was: each runs alone
            for job in jobs:
                self._run_alone(job)
            return
        for job, result in zip(jobs, results, strict=True):
            self._end(job, result, None)

    def _embed_together(self, jobs: list[Job[Any]]) -> list[EmbeddingResult]:
        """One embedding run for every text of `jobs`; each gets its own rows back."""
        texts = [text for job in jobs for text in job.request.texts]
        combined = self._backend.embed(texts, jobs[0].request.normalize, _AllOf(jobs))
        results, start = [], 0
        for job in jobs:
            n = len(job.request.texts)
            tokens = combined.input_tokens[start:start + n]
            results.append(EmbeddingResult(vectors=combined.vectors[start:start + n].copy(),
                                           prompt_tokens=sum(tokens), input_tokens=tokens))
            start += n
        return results

    def _infer_together(self, jobs: list[Job[Any]]) -> list[dict[str, np.ndarray]]:
        """One run of `jobs`' tensors stacked along the first dimension; each gets its own
        rows of every output back."""
        import numpy as np

        requests: list[InferRequest] = [job.request for job in jobs]
        stacked = {name: np.concatenate([r.inputs[name] for r in requests]) for name in requests[0].inputs}
        outputs = list(requests[0].outputs) if requests[0].outputs else None
        combined = self._backend.infer(stacked, outputs, _AllOf(jobs))
        total = sum(r.rows() or 0 for r in requests)
        if any(not array.ndim or array.shape[0] != total for array in combined.values()):
            raise ValueError("an output does not follow the batch dimension")  # then each alone
        results, start = [], 0
        for request in requests:
            n = request.rows() or 0
            results.append({name: array[start:start + n].copy() for name, array in combined.items()})
            start += n
        return results


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
