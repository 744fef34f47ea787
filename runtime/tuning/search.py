"""The search: measure candidates in child processes, score them, keep the fastest safe one.

Greedy, one knob at a time: the agent's current settings are measured first, then for
each knob (in `settings.KNOBS` order) every other value of it on top of the best settings
so far; a candidate replaces the best when its score beats it by `MARGIN` (so noise does
not flip a choice). A time budget bounds the whole run: once spent, the remaining
candidates are listed as skipped and the best so far is the choice.

Score (stated in every record): the weighted geometric mean of a candidate's figures over
the reference's (the default settings, or the first safe candidate when those crash):
decode at the slot count weighs 1/2, decode at 1 sequence 1/4, prompt reading 1/4.

A child that dies on a signal, exits non-zero or outlives `candidate_timeout_s` marks its
candidate unsafe on this machine and build; one whose greedy answer does not repeat is
rejected. Neither is ever chosen, and neither stops the search. A crash (a signal or a
non-zero exit, not a timeout, which a busy machine can cause) is remembered: the next
search with the same fingerprint lists that candidate as unsafe without running it again,
until the machine, the llama.cpp build or the model file changes, or `retry_unsafe` asks.

A choice other than the defaults is run once more beside them (`_rematch`) and kept only if
it still leads: each candidate ran once, at its own moment, and a busy machine can lend one
of them a lead it does not have.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.bundle import ModelBundle
from runtime.devices import MachineSettings

from .cache import cache_path, write_record
from .candidates import alternatives, label, search_knobs
from .fingerprint import file_identity, fingerprint, machine_parts, model_digest
from .settings import TunedSettings, current_settings, pinned_knobs

log = logging.getLogger(__name__)

#: A candidate may take this many times as long as the first safe one (the defaults) before
#: it counts as hung, when that is longer than `candidate_timeout_s`.
TIMEOUT_FACTOR = 4.0
#: A candidate must beat the best so far by this much to replace it.
MARGIN = 0.05
#: Weights of the figures in the score (their logs): decode at the slot count, at 1, prompt.
WEIGHTS = {"decode_slots_tps": 0.5, "decode1_tps": 0.25, "prompt_tps": 0.25}
SCORE_RULE = ("score = (decode at slots / reference)^0.5 x (decode at 1 / reference)^0.25 x "
              "(prompt reading / reference)^0.25; reference: the default settings")


@dataclass(frozen=True)
class TuneOptions:
    """How much to measure. Tests narrow `knobs` to keep the suite fast."""

    #: seconds for the whole search; candidates past it are skipped
    budget_s: float = 30.0
    #: a child running longer is killed and its candidate marked unsafe
    candidate_timeout_s: float = 60.0
    #: only these knobs (None: every knob not pinned)
    knobs: tuple[str, ...] | None = None
    prompt_tokens: int = 128
    decode_tokens: int = 16
    #: run candidates again that crashed in an earlier search with the same fingerprint
    retry_unsafe: bool = False


@dataclass
class Outcome:
    """One measured (or skipped) candidate, a row of `edgefleet tune`'s table."""

    label: str
    knob: str | None
    settings: TunedSettings
    #: "ok", "unsafe" (crashed, failed, timed out), "rejected" (greedy output did not repeat), "skipped"
    status: str
    reason: str | None = None
    figures: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    score: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "knob": self.knob, "settings": self.settings.to_json(), "status": self.status,
                "reason": self.reason, "figures": self.figures, "seconds": round(self.seconds, 2),
                "score": None if self.score is None else round(self.score, 4)}


def score(figures: dict[str, float], reference: dict[str, float]) -> float:
    """`figures` over `reference`, weighted as `WEIGHTS` says (1.0: as fast)."""
    total = 1.0
    for key, weight in WEIGHTS.items():
        if reference.get(key, 0) > 0 and figures.get(key, 0) > 0:
            total *= (figures[key] / reference[key]) ** weight
        else:
            total *= 0.0 if reference.get(key, 0) > 0 else 1.0
    return total


#: how run_child words a crash, which `crashed_before` remembers (a timeout is not one: a busy
#: machine can cause it)
KILLED_BY, EXITED_WITH = "the measuring process was killed by", "the measuring process exited with status"


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


async def run_child(job: dict[str, Any], timeout_s: float) -> tuple[str, str | None, dict[str, Any]]:
    """Run one measuring child: (status, reason, its JSON result). The child is killed when
    it outlives `timeout_s` or when the caller is cancelled (shutdown, SIGTERM)."""
    root = str(Path(__file__).resolve().parents[2])  # where `runtime` is importable from
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    job = {**job, "parent": os.getpid()}  # the child dies with this process (measure.py)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runtime.tuning.measure", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(job).encode()), timeout_s)
    except TimeoutError:
        return "unsafe", f"did not finish within {timeout_s:.0f}s", {}
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    code = proc.returncode or 0
    tail = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
    if code < 0:
        return "unsafe", f"{KILLED_BY} {_signal_name(-code)}", {}
    if code > 0:
        return "unsafe", f"{EXITED_WITH} {code}" + (f": {tail[0]}" if tail else ""), {}
    try:
        result = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return "unsafe", "the measuring process printed no result", {}
    if not result.get("repeatable", False):
        return "rejected", result.get("why") or "greedy output did not repeat", result
    return "ok", None, result


REMEMBERED = "crashed in an earlier run on this machine and build"


def crashed_before(path: Path, current: str) -> dict[str, str]:
    """The candidates that crashed in the cached search at `path`, when it was made for the
    `current` fingerprint: {settings as JSON: why}. A crash there is a property of the
    machine, the build and the model, so running that kernel path again only crashes again."""
    from .cache import read_record

    try:
        record = read_record(path)
    except ValueError:
        return {}
    if record is None or record.get("fingerprint") != current:
        return {}
    crashed = {}
    for candidate in record.get("candidates") or []:
        reason = str(candidate.get("reason") or "")
        if candidate.get("status") == "unsafe" and reason.startswith((KILLED_BY, EXITED_WITH, REMEMBERED)):
            crashed[json.dumps(candidate.get("settings"), sort_keys=True)] = reason
    return crashed


def baseline(bundle: ModelBundle, machine: MachineSettings) -> tuple[TunedSettings, tuple[str, ...], bool]:
    """The settings `bundle` loads with untuned here, the knobs pinned, and whether it runs on
    a GPU (blocking: asks llama.cpp about GPU offload)."""
    from runtime.gguf.gguf_backend import gguf_placement, prompt_chunk

    options = bundle.manifest.gguf
    placement = gguf_placement(options, machine)
    chunk = min(options.n_batch, prompt_chunk(options, placement))
    return (current_settings(options, placement, chunk), pinned_knobs(options, placement, machine),
            placement.n_gpu_layers != 0)


async def tune_model(bundle: ModelBundle, machine: MachineSettings, tuning_dir: Path,
                     options: TuneOptions = TuneOptions(),
                     progress: Callable[[Outcome], None] = lambda outcome: None) -> dict[str, Any]:
    """Measure `bundle`'s candidates, write the record to the cache and return it.

    The record is written once, at the end, atomically: a run cancelled or killed midway
    leaves the previous record (or none)."""
    started = time.monotonic()
    base, pinned, gpu = await asyncio.to_thread(baseline, bundle, machine)
    parts = await asyncio.to_thread(machine_parts)
    digest = await asyncio.to_thread(model_digest, bundle.weights)
    slots = machine.batching.gguf_slots or 0
    job_base = {"bundle": str(bundle.path), "name": bundle.name, "threads": machine.threads,
                "cpu_repack": machine.cpu_repack, "slots": slots,
                "ctx_per_slot": machine.batching.gguf_ctx_per_slot,
                "prompt_tokens": options.prompt_tokens, "decode_tokens": options.decode_tokens}
    if not slots:
        from runtime.scheduling.batching import choose_slots

        job_base["slots"] = choose_slots(machine.batching, gpu)
    outcomes: list[Outcome] = []
    reference: dict[str, float] | None = None
    best: Outcome | None = None
    crashed = {} if options.retry_unsafe else await asyncio.to_thread(
        crashed_before, cache_path(tuning_dir, bundle.name), fingerprint(parts, digest))

    async def measure(settings: TunedSettings, knob: str | None, value: Any) -> Outcome:
        nonlocal reference, best
        name = label(knob, value)
        before = crashed.get(json.dumps(settings.to_json(), sort_keys=True))
        if before is not None:
            why = before if before.startswith(REMEMBERED) else f"{REMEMBERED} ({before}); not run again"
            outcome = Outcome(name, knob, settings, "unsafe", why)
        elif outcomes and time.monotonic() - started > options.budget_s:  # the defaults are always measured
            outcome = Outcome(name, knob, settings, "skipped", f"over the {options.budget_s:.0f}s budget")
        else:
            t0 = time.monotonic()
            # on a loaded machine the default itself may take long: a candidate gets 4 times as long
            first = next((o.seconds for o in outcomes if o.status == "ok"), 0.0)
            status, reason, result = await run_child({**job_base, "label": name, "settings": settings.to_json()},
                                                     max(options.candidate_timeout_s, TIMEOUT_FACTOR * first))
            figures = {k: float(result[k]) for k in WEIGHTS if k in result}
            outcome = Outcome(name, knob, settings, status, reason, figures, time.monotonic() - t0)
            if status == "ok":
                reference = reference or figures
                outcome.score = score(figures, reference)
                if best is None or best.score is None or outcome.score > best.score * (1 + MARGIN):
                    best = outcome
        if outcome.status in ("unsafe", "rejected"):
            log.warning("%s: tuning candidate %s is %s: %s", bundle.name, name, outcome.status, outcome.reason)
        outcomes.append(outcome)
        progress(outcome)
        return outcome

    await measure(base, None, None)
    for knob in search_knobs(pinned, options.knobs):
        start_from = best.settings if best is not None else base
        for candidate in alternatives(knob, start_from, machine.cpu, gpu):
            await measure(candidate, knob, candidate.knob(knob))
    rematch = await _rematch(best, outcomes, job_base, options, bundle.name)
    if rematch is not None and not rematch["held"]:
        best = outcomes[0]  # the defaults: the choice's lead was one run's luck on a busy machine
    chosen = best.settings if best is not None else None
    record = {
        "model": {"name": bundle.name, "version": bundle.version, "file": str(bundle.weights), "sha256": digest,
                  "identity": file_identity(bundle.weights)},
        "fingerprint": fingerprint(parts, digest),
        "machine": parts.to_json(),
        "tuned_at": time.time(),
        "took_s": round(time.monotonic() - started, 2),
        "slots": job_base["slots"],
        "default": base.to_json(),
        "pinned": list(pinned),
        "candidates": [o.to_json() for o in outcomes],
        "choice": chosen.to_json() if chosen is not None else None,
        "choice_label": best.label if best is not None else None,
        "score_rule": SCORE_RULE,
        "rematch": rematch,
    }
    await asyncio.to_thread(write_record, cache_path(tuning_dir, bundle.name), record)
    log.info("%s: tuned in %.1fs: %s", bundle.name, record["took_s"],
             chosen.describe() if chosen is not None else "every candidate failed; defaults kept")
    return record


async def _rematch(best: Outcome | None, outcomes: list[Outcome], job_base: dict[str, Any], options: TuneOptions,
                   name: str) -> dict[str, Any] | None:
    """The choice against the defaults once more, back to back, when it is not the defaults.

    Each candidate of the search ran once, at its own moment; on a machine that is busy
    meanwhile (the agent serving, another process) one run's luck can make a choice. Run
    side by side, noise hits both: the choice is kept only if it still leads by `MARGIN`."""
    default = outcomes[0] if outcomes else None
    if best is None or default is None or best is default or default.status != "ok":
        return None
    figures: list[dict[str, float]] = []
    for outcome in (default, best):
        timeout = max(options.candidate_timeout_s, TIMEOUT_FACTOR * default.seconds)
        status, _, result = await run_child({**job_base, "label": f"rematch {outcome.label}",
                                             "settings": outcome.settings.to_json()}, timeout)
        if status != "ok":
            return {"held": False, "why": f"{outcome.label} was {status} in the rematch"}
        figures.append({k: float(result[k]) for k in WEIGHTS if k in result})
    lead = score(figures[1], figures[0])
    held = lead > 1 + MARGIN
    if not held:
        log.info("%s: tuning's choice %s led the defaults by only %.2fx when run again; defaults kept",
                 name, best.label, lead)
    return {"held": held, "default": figures[0], "choice": figures[1], "score": round(lead, 4)}


def differs(record: dict[str, Any], settings: TunedSettings) -> bool:
    """Whether a record's choice differs from `settings` (then a loaded model is reloaded)."""
    choice = record.get("choice")
    return choice is not None and TunedSettings.from_json(choice) != settings

