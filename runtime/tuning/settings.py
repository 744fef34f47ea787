"""The knobs tuning sets, which of them are pinned, and how a choice reaches the engines.

Pure data and pure functions: `apply_tuning` turns the bundle's `GgufOptions` and the
machine's `LlamaPlacement` into the resolved pair that `GgufBackend` and the batching
engine read, with every knob the bundle or the config sets left as they set it. What was
measured, and where it is cached, is the other modules' business.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from runtime.bundle import GgufOptions, ModelBundle
    from runtime.devices import LlamaPlacement, MachineSettings

log = logging.getLogger(__name__)

#: GgufOptions' default n_batch: at this value the bundle leaves the batch size to the machine.
DEFAULT_N_BATCH = 512

#: The knobs, in the order the search tries them (the likeliest to matter first).
KNOBS = ("attention", "prompt_chunk", "threads_batch", "threads", "ubatch", "repack")


@dataclass(frozen=True)
class TunedSettings:
    """One candidate: every knob tuning sets, as the engines take them."""

    kv_cache_type: Literal["f16", "q8_0"]
    flash_attn: bool
    #: tokens per prompt piece (GgufOptions.prompt_chunk)
    prompt_chunk: int
    #: decode threads and prompt threads (LlamaPlacement.n_threads / n_threads_batch)
    n_threads: int
    n_threads_batch: int
    #: GgufOptions.n_batch, which is also the batching engine's n_ubatch bound (its calls
    #: carry at most this many rows), hence "ubatch" in tables and metrics
    n_batch: int
    #: llama.cpp CPU weight repacking (LlamaPlacement.use_extra_bufts); never on with AMX
    cpu_repack: bool

    def __post_init__(self) -> None:
        if self.kv_cache_type == "q8_0" and not self.flash_attn:
            raise ValueError("kv_cache_type q8_0 needs flash attention")
        if not 1 <= self.prompt_chunk <= self.n_batch or self.n_threads < 1 or self.n_threads_batch < 1:
            raise ValueError(f"invalid tuned settings {self}")

    @property
    def attention(self) -> str:
        """The KV cache type and flash attention as one knob (q8_0 needs flash attention)."""
        return f"{self.kv_cache_type}+fa" if self.flash_attn else self.kv_cache_type

    def with_knob(self, knob: str, value: Any) -> TunedSettings:
        """These settings with one knob changed (`attention` takes "q8_0+fa", "f16+fa" or "f16")."""
        if knob == "attention":
            kv, _, fa = str(value).partition("+")
            return dataclasses.replace(self, kv_cache_type=kv, flash_attn=fa == "fa")  # type: ignore[arg-type]
        field = {"prompt_chunk": "prompt_chunk", "threads": "n_threads", "threads_batch": "n_threads_batch",
                 "ubatch": "n_batch", "repack": "cpu_repack"}[knob]
        return dataclasses.replace(self, **{field: value})

    def knob(self, knob: str) -> Any:
        return {"attention": self.attention, "prompt_chunk": self.prompt_chunk, "threads": self.n_threads,
                "threads_batch": self.n_threads_batch, "ubatch": self.n_batch, "repack": self.cpu_repack}[knob]

    def describe(self) -> str:
        """One line for logs and doctor."""
        return (f"KV cache {self.kv_cache_type}, flash attention {'on' if self.flash_attn else 'off'}, "
                f"prompt pieces of {self.prompt_chunk}, {self.n_threads} decode / {self.n_threads_batch} prompt "
                f"threads, ubatch {self.n_batch}, weight repacking {'on' if self.cpu_repack else 'off'}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TunedSettings:
        return cls(kv_cache_type=data["kv_cache_type"], flash_attn=bool(data["flash_attn"]),
                   prompt_chunk=int(data["prompt_chunk"]), n_threads=int(data["n_threads"]),
                   n_threads_batch=int(data["n_threads_batch"]), n_batch=int(data["n_batch"]),
                   cpu_repack=bool(data["cpu_repack"]))


@dataclass(frozen=True)
class Choice:
    """A cached choice as a loader finds it: the settings, when and for what they were measured."""

    settings: TunedSettings
    fingerprint: str
    tuned_at: float


@dataclass(frozen=True)
class AppliedTuning:
    """What a loaded model runs with after tuning: shown by /metrics, doctor and telemetry."""

    settings: TunedSettings
    fingerprint: str
    tuned_at: float
    #: knobs the bundle or the config set, which kept their values
    pinned: tuple[str, ...]

    def labels(self) -> dict[str, str]:
        """Bounded label values for the edgefleet_model_tuned_info gauge."""
        s = self.settings
        return {"kv_cache_type": s.kv_cache_type, "flash_attn": "true" if s.flash_attn else "false",
                "prompt_chunk": str(s.prompt_chunk), "threads": str(s.n_threads),
                "threads_batch": str(s.n_threads_batch), "ubatch": str(s.n_batch)}

    def to_json(self) -> dict[str, Any]:
        """The `tuned` field of a model in telemetry records (docs/telemetry.md)."""
        s = self.settings
        return {"kv_cache_type": s.kv_cache_type, "flash_attn": s.flash_attn, "prompt_chunk": s.prompt_chunk,
                "threads": s.n_threads, "threads_batch": s.n_threads_batch, "ubatch": s.n_batch,
                "cpu_repack": s.cpu_repack, "fingerprint": self.fingerprint[:16],
                "tuned_at": round(self.tuned_at, 3), "pinned": list(self.pinned)}


class TuningSource(Protocol):
    """Where a loader finds the choice for a bundle (the cache, or a candidate in a child)."""

    def choice_for(self, bundle: ModelBundle) -> Choice | None: ...


@dataclass(frozen=True)
class FixedChoice:
    """A source that gives every bundle the same settings: how a measuring child loads its candidate."""

    settings: TunedSettings

    def choice_for(self, bundle: ModelBundle) -> Choice | None:
        return Choice(self.settings, "candidate", time.time())


def pinned_knobs(options: GgufOptions, placement: LlamaPlacement, machine: MachineSettings) -> tuple[str, ...]:
    """Knobs the bundle or the config sets, which tuning leaves alone.

    The bundle pins the attention knob with an explicit `kv_cache_type` or with
    `flash_attn = false` (flash attention on is the default every bundle writes, so it
    pins nothing by itself), `prompt_chunk` when it is not "auto", ubatch when `n_batch`
    differs from its default; the config pins threads with `[runtime] threads` and
    repacking with `[runtime] cpu_repack`. Repacking is pinned off on an AMX CPU (its
    repacking crashes, llama.cpp #20824) and on a GPU (nothing to repack there)."""
    pinned = []
    if options.kv_cache_type != "auto" or not options.flash_attn:
        pinned.append("attention")
    if options.prompt_chunk != "auto":
        pinned.append("prompt_chunk")
    if options.n_batch != DEFAULT_N_BATCH:
        pinned.append("ubatch")
    if machine.threads > 0:
        pinned += ["threads", "threads_batch"]
    if machine.cpu_repack is not None or machine.cpu.has_amx or placement.n_gpu_layers != 0:
        pinned.append("repack")
    return tuple(k for k in KNOBS if k in pinned)


def current_settings(options: GgufOptions, placement: LlamaPlacement, chunk: int) -> TunedSettings:
    """The settings a model loads with untuned (`chunk`: what "auto" prompt_chunk resolves to)."""
    return TunedSettings(kv_cache_type=options.kv_type, flash_attn=options.flash_attn, prompt_chunk=chunk,
                         n_threads=placement.n_threads, n_threads_batch=placement.n_threads_batch,
                         n_batch=options.n_batch, cpu_repack=placement.use_extra_bufts)


def apply_tuning(source: TuningSource | None, bundle: ModelBundle, options: GgufOptions,
                 placement: LlamaPlacement, machine: MachineSettings, chunk: int,
                 ) -> tuple[GgufOptions, LlamaPlacement, AppliedTuning | None]:
    """`options` and `placement` with the cached choice for `bundle` applied to every knob
    nobody pinned. Without a choice (none cached, or measured for another machine or model
    file) they are returned as they are. A choice that no longer fits the bundle (its pins
    changed since) is dropped with a warning rather than failing the load."""
    try:
        choice = source.choice_for(bundle) if source is not None else None
    except Exception:  # tuning must never keep a model from loading
        log.exception("%s: cannot read the cached tuning; loading with the default settings", bundle.name)
        choice = None
    if choice is None:
        return options, placement, None
    pinned = pinned_knobs(options, placement, machine)
    merged = current_settings(options, placement, chunk)
    try:
        for knob in KNOBS:  # each step validates (a pinned n_batch below a tuned chunk raises)
            if knob not in pinned:
                merged = merged.with_knob(knob, choice.settings.knob(knob))
        tuned_options = dataclasses.replace(
            options, kv_cache_type=merged.kv_cache_type, flash_attn=merged.flash_attn,
            prompt_chunk=merged.prompt_chunk, n_batch=merged.n_batch)
    except ValueError as exc:
        log.warning("%s: the tuned settings do not fit the bundle (%s); loading with its defaults", bundle.name, exc)
        return options, placement, None
    if merged.cpu_repack and machine.cpu.has_amx:
        merged = dataclasses.replace(merged, cpu_repack=False)  # never, whatever a cache file says
    reason = (f"tuned on this machine {time.strftime('%Y-%m-%d %H:%M', time.localtime(choice.tuned_at))}: "
              f"{merged.describe()}" + (f" ({', '.join(pinned)} as configured)" if pinned else ""))
    tuned_placement = dataclasses.replace(
        placement, n_threads=merged.n_threads, n_threads_batch=merged.n_threads_batch,
        use_extra_bufts=merged.cpu_repack, reasons=(*placement.reasons, reason))
    return tuned_options, tuned_placement, AppliedTuning(merged, choice.fingerprint, choice.tuned_at, pinned)
