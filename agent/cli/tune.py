"""`edgefleet tune [MODEL]`: measure llama.cpp settings on this machine again, now.

Runs the same search the agent runs at start (runtime/tuning/), whatever the cache
says, for one GGUF model or every configured one, and prints each candidate's figures
and the choice (or, with --json, the records written). The state dir's lock is not
taken: the only file written is ``<state_dir>/tuning/<model>.json``, atomically, so a
running agent keeps serving and applies the new choice at the model's next load.
SIGTERM or Ctrl-C stops the measuring child and leaves the previous record in place.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import TUNING_KNOBS, AgentConfig, ModelEntry


class TuneCliError(Exception):
    """A one-line problem; exit status 1 (2 for bad arguments)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def add_tune_command(commands: Any, add_config: Callable[[argparse.ArgumentParser], None]) -> None:
    tune = commands.add_parser("tune", help="measure llama.cpp settings for GGUF models on this machine "
                               "and cache the fastest (docs/operations.md)")
    add_config(tune)
    tune.add_argument("model", nargs="?", help="one model (default: every configured GGUF chat/completion model)")
    tune.add_argument("--json", action="store_true", help="print the records written, as JSON")
    tune.add_argument("--knobs", help=f"comma-separated knobs to search (default: all): {', '.join(TUNING_KNOBS)}")
    tune.add_argument("--budget", type=float, help="seconds per model (default: [tuning] budget_s)")
    tune.add_argument("--retry-unsafe", action="store_true",
                      help="run candidates again that crashed in an earlier run on this machine and build")
    tune.add_argument("--prompt-tokens", type=int, default=128, help="tokens of the prompt read (default 128)")
    tune.add_argument("--decode-tokens", type=int, default=16,
                      help="tokens each answer generates (default 16; fewer: faster, noisier)")


def _bundles(config: AgentConfig, name: str | None) -> list[Any]:
    from agent.fleet.updates import with_managed_models
    from agent.local_models import with_imported_models
    from runtime.bundle import read_bundle
    from runtime.errors import RuntimeLayerError
    from runtime.tuning.service import tunable

    listed = with_imported_models(with_managed_models(config))
    entries = [e for e in listed.models if name is None or e.name == name]
    if name is not None and not entries and (Path(config.state_dir) / "models" / name / "current").is_dir():
        entries = [ModelEntry(name=name)]  # in the state dir, not configured (a demo bundle, say)
    if name is not None and not entries:
        known = ", ".join(e.name for e in listed.models) or "none"
        raise TuneCliError(f"no model named {name!r} is configured or imported (known: {known})")
    bundles = []
    for entry in entries:
        try:
            bundle = read_bundle(listed.bundle_path(entry), name=entry.name)
        except (RuntimeLayerError, OSError) as exc:
            if name is not None:
                raise TuneCliError(f"model {entry.name}: {exc}") from None
            continue
        if tunable(bundle):
            bundles.append(bundle)
        elif name is not None:
            raise TuneCliError(f"model {name} is {bundle.manifest.format} {bundle.manifest.task}: only GGUF "
                               "chat and completion models are tuned")
    if not bundles:
        raise TuneCliError("no GGUF chat or completion model to tune")
    return bundles


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(record: dict[str, Any]) -> str:
    """The candidates of one record as a table, and the choice."""
    rows = [("candidate", "status", "prompt tok/s", "decode@1 tok/s", f"decode@{record['slots']} tok/s",
             "score", "seconds", "why")]
    for c in record["candidates"]:
        f = c["figures"]
        rows.append((c["label"], c["status"], _figure(f.get("prompt_tps")), _figure(f.get("decode1_tps")),
                     _figure(f.get("decode_slots_tps")), "-" if c["score"] is None else f"{c['score']:.3f}",
                     f"{c['seconds']:.1f}", c["reason"] or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=False)) + ("  " + r[-1] if r[-1] else "")
             for r in rows]
    from runtime.tuning.settings import TunedSettings

    choice = record.get("choice")
    chosen = (f"choice: {record['choice_label']}: {TunedSettings.from_json(choice).describe()}" if choice
              else "choice: none (every candidate failed); the model keeps its defaults")
    rematch = record.get("rematch")
    if rematch and "score" in rematch:
        chosen += (f"\nrematch beside the defaults: {rematch['score']:.2f}x, "
                   + ("kept" if rematch["held"] else "not enough of a lead: the defaults are kept"))
    elif rematch:
        chosen += f"\nrematch beside the defaults failed ({rematch['why']}): the defaults are kept"
    pinned = f" (pinned by the bundle or config: {', '.join(record['pinned'])})" if record["pinned"] else ""
    return "\n".join([f"{record['model']['name']}: tuned in {record['took_s']:.1f}s, fingerprint "
                      f"{record['fingerprint'][:16]}{pinned}", *lines, chosen, record["score_rule"]])


async def _tune_all(config: AgentConfig, bundles: list[Any], knobs: tuple[str, ...] | None,
                    budget: float | None, args: argparse.Namespace) -> list[dict[str, Any]]:
    from agent.app import machine_settings
    from agent.tuning import tune_options, tuning_dir
    from runtime.tuning.search import tune_model

    options = tune_options(config)
    if knobs is not None:
        options = dataclasses.replace(options, knobs=knobs)
    if budget is not None:
        options = dataclasses.replace(options, budget_s=budget)
    options = dataclasses.replace(options, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                                  retry_unsafe=args.retry_unsafe)
    machine = machine_settings(config)
    records = []
    for bundle in bundles:
        def progress(outcome: Any, name: str = bundle.name) -> None:
            if not args.json:
                print(f"{name}: {outcome.label}: {outcome.status}", file=sys.stderr, flush=True)

        records.append(await tune_model(bundle, machine, tuning_dir(config), options, progress))
    return records


def run_tune(config: AgentConfig, args: argparse.Namespace) -> int:
    knobs = None
    if args.knobs:
        knobs = tuple(k.strip() for k in args.knobs.split(",") if k.strip())
        unknown = [k for k in knobs if k not in TUNING_KNOBS]
        if unknown:
            raise TuneCliError(f"--knobs: unknown knob {unknown[0]!r} (known: {', '.join(TUNING_KNOBS)})", code=2)
    if args.budget is not None and not args.budget > 0:
        raise TuneCliError("--budget must be more than 0", code=2)
    if not 8 <= args.prompt_tokens <= 4096 or not 2 <= args.decode_tokens <= 1024:
        raise TuneCliError("--prompt-tokens must be 8..4096 and --decode-tokens 2..1024", code=2)
    bundles = _bundles(config, args.model)

    async def main() -> list[dict[str, Any]]:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)  # kill the child, write nothing
        return await _tune_all(config, bundles, knobs, args.budget, args)

    try:
        records = asyncio.run(main())
    except asyncio.CancelledError:
        raise TuneCliError("stopped; the cached tuning is unchanged", code=143) from None
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print("\n\n".join(format_table(r) for r in records))
        print(f"cached in {Path(config.state_dir) / 'tuning'}")
    return 0
