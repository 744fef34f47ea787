"""Which values each knob may take on this machine, and the order they are tried in.

The set is kept small on purpose: the search changes one knob at a time from the best
settings so far (greedy), so a model costs one measurement per value listed here, not
one per combination, and fits in about 30 s on 2 cores for the demo model.
"""

from __future__ import annotations

from typing import Any

from runtime.devices import CpuDescription

from .settings import KNOBS, TunedSettings

#: Prompt piece sizes tried (within n_batch); the default 64 is among them.
PROMPT_CHUNKS = (32, 64, 128, 256)
#: n_batch values tried (the batching engine's calls carry at most n_batch rows: its ubatch).
UBATCHES = (256, 512)
#: The attention knob: KV cache type, with flash attention ("+fa") or without (f16 only:
#: llama.cpp quantizes the V cache only with flash attention).
ATTENTION = ("q8_0+fa", "f16+fa", "f16")


def knob_values(knob: str, base: TunedSettings, cpu: CpuDescription, gpu: bool) -> list[Any]:
    """Every value of `knob` worth measuring on this machine, `base`'s own value included."""
    if knob == "attention":
        values: list[Any] = list(ATTENTION)
    elif knob == "prompt_chunk":
        values = [c for c in PROMPT_CHUNKS if c <= base.n_batch] + ([base.n_batch] if gpu else [])
    elif knob in ("threads", "threads_batch"):
        cores = {max(1, cpu.physical_cores // 2), cpu.physical_cores, cpu.logical_cores}
        values = sorted(cores)
    elif knob == "ubatch":
        values = [u for u in UBATCHES if u >= base.prompt_chunk]
    elif knob == "repack":
        values = [False] if cpu.has_amx else [True, False]  # AMX repacking crashes (llama.cpp #20824)
    else:
        raise ValueError(f"unknown knob {knob!r}")
    current = base.knob(knob)
    return sorted(set(values) | {current}, key=lambda v: (v != current, str(v)))


def alternatives(knob: str, base: TunedSettings, cpu: CpuDescription, gpu: bool) -> list[TunedSettings]:
    """`base` with `knob` set to each other value worth measuring."""
    current = base.knob(knob)
    return [base.with_knob(knob, value) for value in knob_values(knob, base, cpu, gpu) if value != current]


def search_knobs(pinned: tuple[str, ...], only: tuple[str, ...] | None = None) -> list[str]:
    """The knobs the search goes through, in order: all that are not pinned, or just `only`."""
    wanted = KNOBS if not only else tuple(k for k in KNOBS if k in only)
    return [k for k in wanted if k not in pinned]


def label(knob: str | None, value: Any = None) -> str:
    """A candidate's name in tables, logs and the crash-injection variable: `knob=value`."""
    if knob is None:
        return "default"
    if isinstance(value, bool):
        value = "on" if value else "off"
    return f"{knob}={value}"
