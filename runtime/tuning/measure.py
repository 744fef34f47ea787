"""The child process that measures one candidate: ``python -m runtime.tuning.measure``.

It reads a job (JSON on stdin: the bundle, the candidate's settings, the slot count),
loads the model exactly as the agent would with those settings (`GgufBackend` and its
batching engine, through the same `apply_tuning` path), and prints one JSON line:

- prompt reading, tokens/s: a fixed synthetic prompt read alone (to its first token);
- decode at 1 sequence, tokens/s: the rest of that request's answer;
- decode at the slot count, tokens/s (all sequences together): the same greedy prompt
  again beside `slots - 1` other requests, all generating at once;
- whether greedy output repeats: the greedy answer beside the others (read in other
  call shapes, reusing what the engine's prefix cache may reuse) must be the answer it
  gave alone, token for token (docs/architecture.md, "Repeatable greedy output").

It is a process of its own so that a kernel path that crashes (a segfault, an abort)
or hangs takes only this process down: the parent marks the candidate unsafe. For the
tests, ``EDGEFLEET_TUNING_CRASH=<candidate label>`` makes this entry point abort right
after loading that one candidate; nothing else reads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The fault injection of the tests: the label of a candidate whose child aborts after loading.
CRASH_ENV = "EDGEFLEET_TUNING_CRASH"
#: Text the synthetic prompts repeat (ordinary prose, so the tokenizer sees ordinary text).
PROMPT_TEXT = ("The lighthouse keeper wrote down the weather every morning: the wind, the clouds, "
               "the colour of the sea and the ships that passed the point before noon. ")


@dataclass
class _Collect:
    """A JobContext that keeps the text and when it started arriving."""

    text: list[str] = field(default_factory=list)
    first_at: float | None = None

    def __post_init__(self) -> None:
        from runtime.backend import ModelLimits

        self.limits = ModelLimits()

    def cancelled(self) -> bool:
        return False

    def emit(self, item: Any) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()
        text = getattr(item, "text", None)
        if text is not None:
            self.text.append(text)


def _eog_bias(backend: Any) -> dict[int, float]:
    """A logit bias that keeps every end-of-generation token out, so answers run their length."""
    import llama_cpp

    vocab = backend.vocab
    return {t: -1000.0 for t in range(backend.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}


def _prompt(backend: Any, index: int, tokens: int) -> list[int]:
    """A prompt of exactly `tokens` tokens, distinct for each `index` (so no prefix is shared)."""
    words = f"Entry {index}. " + PROMPT_TEXT * (tokens // 20 + 2)
    ids = backend.llm.tokenize(words.encode(), add_bos=True, special=False)
    return list(ids[:tokens])


def _serve(backend: Any, requests: list[Any]) -> tuple[list[_Collect], list[Any], float]:
    """Run `requests` together to their ends (the batching engine, as its scheduler steps it;
    one after another without one). Returns their contexts, results and the end time."""
    contexts = [_Collect() for _ in requests]
    results: list[Any] = [None] * len(requests)
    engine = backend.engine
    if engine is None:
        for i, (request, ctx) in enumerate(zip(requests, contexts, strict=True)):
            results[i] = backend.generate(request, ctx)
        return contexts, results, time.perf_counter()
    for request, ctx in zip(requests, contexts, strict=True):
        engine.add(request, ctx)
    pending = {id(ctx): i for i, ctx in enumerate(contexts)}
    while pending:
        for ctx, result, error in engine.step():
            if error is not None:
                raise error
            results[pending.pop(id(ctx))] = result
    return contexts, results, time.perf_counter()


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Load the candidate of `job` and measure it (see the module docstring)."""
    from runtime.backend import GenerationRequest
    from runtime.bundle import read_bundle
    from runtime.devices import MachineSettings, describe_cpu
    from runtime.gguf.gguf_backend import GgufBackend
    from runtime.scheduling.batching import BatchingSettings

    from .settings import FixedChoice, TunedSettings

    started = time.perf_counter()
    bundle = read_bundle(Path(job["bundle"]), name=job["name"])
    settings = TunedSettings.from_json(job["settings"])
    machine = MachineSettings(
        cpu=describe_cpu(), threads=int(job.get("threads", 0)), cpu_repack=job.get("cpu_repack"),
        batching=BatchingSettings(gguf_slots=int(job["slots"]), gguf_ctx_per_slot=int(job.get("ctx_per_slot", 0))),
        tuning=FixedChoice(settings))
    backend = GgufBackend(bundle, machine)
    if os.environ.get(CRASH_ENV) == job["label"]:
        os.abort()  # the tests' stand-in for a kernel path that crashes
    try:
        engine = backend.engine
        if engine is not None:
            engine.warm()  # as the model thread does before its first step
        loaded = time.perf_counter()
        bias = _eog_bias(backend)
        n = int(job.get("decode_tokens", 32))
        probe = GenerationRequest(prompt=_prompt(backend, 0, int(job.get("prompt_tokens", 128))),
                                  max_tokens=n, temperature=0.0, logit_bias=bias)
        t0 = time.perf_counter()
        (alone,), (alone_result,), end = _serve(backend, [probe])
        assert alone.first_at is not None
        prompt_tps = len(probe.prompt or []) / (alone.first_at - t0)
        decode1_tps = (alone_result.completion_tokens - 1) / max(1e-9, end - alone.first_at)
        slots = engine.slots if engine is not None else 1
        others = [GenerationRequest(prompt=_prompt(backend, i, 16), max_tokens=n, temperature=1.0, logit_bias=bias)
                  for i in range(1, slots)]
        contexts, results, end = _serve(backend, [probe, *others])
        all_started = max(ctx.first_at or end for ctx in contexts)
        tokens = sum(r.completion_tokens for r in results) - len(results)
        decode_slots_tps = tokens / max(1e-9, end - all_started)
        same = "".join(contexts[0].text) == "".join(alone.text)
        return {
            "prompt_tps": round(prompt_tps, 2), "decode1_tps": round(decode1_tps, 2),
            "decode_slots_tps": round(decode_slots_tps, 2), "slots": slots,
            "repeatable": same,
            "why": None if same else ("the greedy answer beside other requests differed from the answer alone: "
                                      f"{''.join(alone.text)[:60]!r} / {''.join(contexts[0].text)[:60]!r}"),
            "rows_independent": getattr(engine, "rows_independent", None),
            "splits_free": getattr(engine, "splits_free", None),
            "load_s": round(loaded - started, 3), "measure_s": round(time.perf_counter() - loaded, 3),
        }
    finally:
        backend.close()


def die_with_parent(parent: int | None) -> None:
    """Get SIGKILL when the process that started this one dies (Linux), so an agent killed
    mid-search leaves no measuring child behind; exit at once if it is gone already."""
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        sys.exit(1)


def main() -> int:
    job = json.loads(sys.stdin.read())
    die_with_parent(job.get("parent"))
    result = measure(job)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
