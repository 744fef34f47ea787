"""Where a model runs: GPU offload, onnxruntime providers, thread counts, CPU quirks.

Every decision is a pure function of a description of the machine (what the
libraries report, what /proc/cpuinfo says), so each path — CUDA, ARM, an x86
CPU with AMX — is unit-tested on this machine with a faked description. The
functions that read the real machine are thin and kept apart at the bottom.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.scheduling.batching import BatchingSettings

if TYPE_CHECKING:
    from runtime.tuning.settings import TuningSource

log = logging.getLogger(__name__)

#: onnxruntime providers in the order we prefer them when the library reports them.
#: TensorRT is left out on purpose: its engine build takes minutes on first load.
ONNX_PROVIDER_PREFERENCE: tuple[str, ...] = (
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "DmlExecutionProvider",
    "CoreMLExecutionProvider",
    "OpenVINOExecutionProvider",
    "CPUExecutionProvider",
)

#: CPU flags for which llama.cpp's AMX weight repacking crashes at the first decode
#: (ggml_backend_amx_mul_mat, llama.cpp #20824).
AMX_FLAGS = frozenset({"amx_int8", "amx_tile", "amx_bf16"})


@dataclass(frozen=True)
class CpuDescription:
    """What matters about the CPU: architecture, feature flags and core counts."""

    arch: str
    flags: frozenset[str] = field(default_factory=frozenset)
    physical_cores: int = 1
    logical_cores: int = 1

    @property
    def has_amx(self) -> bool:
        return self.arch in ("x86_64", "amd64") and bool(self.flags & AMX_FLAGS)


@dataclass(frozen=True)
class MachineSettings:
    """The machine as the agent was told to use it: the CPU, and operator overrides."""

    cpu: CpuDescription
    #: 0: size thread pools to the machine.
    threads: int = 0
    #: None: decide llama.cpp CPU weight repacking from the CPU (off on AMX).
    cpu_repack: bool | None = None
    #: How many requests a model serves at once (runtime/scheduling/batching.py).
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    #: Where GGUF loads find settings measured on this machine (runtime/tuning/); None: defaults.
    tuning: TuningSource | None = None


@dataclass(frozen=True)
class LlamaPlacement:
    """How a GGUF model is loaded on this machine, and why (logged at load)."""

    n_gpu_layers: int
    n_threads: int
    n_threads_batch: int
    #: llama.cpp's extra buffer types (CPU weight repacking: AMX, AArch64, AVX2 paths).
    use_extra_bufts: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class OnnxPlacement:
    """Which onnxruntime providers a session uses and how many threads, and why."""

    providers: tuple[str, ...]
    intra_op_threads: int
    reasons: tuple[str, ...]


def parse_cpuinfo(text: str, arch: str) -> frozenset[str]:
    """Feature flags from /proc/cpuinfo (x86 'flags', ARM 'Features')."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def decode_threads(cpu: CpuDescription, requested: int = 0) -> int:
    """Threads for token generation: physical cores (hyper-threads slow decode down)."""
    if requested > 0:
        return requested
    return max(1, cpu.physical_cores)


def choose_llama_placement(
    cpu: CpuDescription,
    gpu_offload_supported: bool,
    requested_gpu_layers: int | str = "auto",
    requested_threads: int = 0,
    allow_cpu_repack: bool | None = None,
) -> LlamaPlacement:
    """Decide GPU layers, threads and CPU repacking for llama.cpp on this machine."""
    reasons: list[str] = []
    if requested_gpu_layers == "auto":
        n_gpu_layers = -1 if gpu_offload_supported else 0
        reasons.append(
            "llama.cpp reports GPU offload: all layers on the GPU"
            if gpu_offload_supported
            else "llama.cpp reports no GPU offload: CPU only"
        )
    else:
        n_gpu_layers = int(requested_gpu_layers)
        if n_gpu_layers != 0 and not gpu_offload_supported:
            reasons.append(f"{n_gpu_layers} GPU layers asked for, but this llama.cpp build "
                           "has no GPU offload: CPU only")
            n_gpu_layers = 0
        else:
            reasons.append(f"{n_gpu_layers} GPU layers as configured")

    if allow_cpu_repack is None:
        use_extra_bufts = not cpu.has_amx
        reasons.append(
            "AMX CPU: weight repacking off (llama.cpp AMX path crashes at decode, #20824)"
            if cpu.has_amx
            else f"{cpu.arch} CPU: weight repacking on"
        )
    else:
        use_extra_bufts = allow_cpu_repack
        reasons.append(f"weight repacking {'on' if allow_cpu_repack else 'off'} as configured")

    n_threads = decode_threads(cpu, requested_threads)
    n_threads_batch = requested_threads if requested_threads > 0 else max(1, cpu.logical_cores)
    reasons.append(f"{n_threads} decode / {n_threads_batch} prompt threads")
    return LlamaPlacement(
        n_gpu_layers=n_gpu_layers,
        n_threads=n_threads,
        n_threads_batch=n_threads_batch,
        use_extra_bufts=use_extra_bufts,
        reasons=tuple(reasons),
    )


def choose_onnx_placement(
    cpu: CpuDescription,
    available: Sequence[str],
    preferred: Iterable[str] = (),
    requested_threads: int = 0,
) -> OnnxPlacement:
    """Pick providers from what onnxruntime reports, best first, CPU always last."""
    available_set = set(available)
    reasons: list[str] = []
    wanted = list(preferred)
    missing = [p for p in wanted if p not in available_set]
    if missing:
        reasons.append(f"configured providers not available here: {', '.join(missing)}")
    order = [p for p in wanted if p in available_set] or [
        p for p in ONNX_PROVIDER_PREFERENCE if p in available_set
    ]
    if "CPUExecutionProvider" not in order:
        order.append("CPUExecutionProvider")
    reasons.append("providers: " + ", ".join(order))
    threads = decode_threads(cpu, requested_threads)
    reasons.append(f"{threads} intra-op threads")
    return OnnxPlacement(providers=tuple(order), intra_op_threads=threads, reasons=tuple(reasons))


# --- reading the real machine -------------------------------------------------


def describe_cpu(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> CpuDescription:
    """This machine's CPU, as the kernel reports it (cgroup CPU limits respected)."""
    import psutil

    arch = platform.machine().lower()
    try:
        flags = parse_cpuinfo(cpuinfo_path.read_text(encoding="utf-8", errors="replace"), arch)
    except OSError:
        flags = frozenset()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    logical = usable or psutil.cpu_count(logical=True) or 1
    physical = psutil.cpu_count(logical=False) or logical
    return CpuDescription(
        arch=arch, flags=flags, physical_cores=min(physical, logical), logical_cores=logical
    )


def llama_gpu_offload_supported() -> bool:
    """Whether the installed llama.cpp was built with a GPU backend that found a device."""
    import llama_cpp

    from runtime.gguf.llama_backends import load_llama_backends

    load_llama_backends()

    return bool(llama_cpp.llama_supports_gpu_offload())


def onnx_available_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


#: llama.cpp's compile-time CPU features (as llama_print_system_info names them) and the
#: /proc/cpuinfo flag each needs; x86 first, then ARM.
LLAMA_FEATURE_FLAGS: dict[str, str] = {
    "SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma",
    "BMI2": "bmi2", "AVX_VNNI": "avx_vnni", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
    "NEON": "asimd", "DOTPROD": "asimddp", "MATMUL_INT8": "i8mm", "SVE": "sve", "SME": "sme",
}


def missing_cpu_features(llama_system_info: str, cpu: CpuDescription) -> list[str]:
    """Instruction sets this llama.cpp build was compiled to use that the CPU lacks.

    A wheel built with llama.cpp's default GGML_NATIVE=ON targets the build machine's
    CPU; copied to an older CPU it dies with SIGILL at the first matrix product. Only
    features of the CPU's own architecture are compared (an x86 feature list says
    nothing about an ARM CPU).
    """
    if not cpu.flags:
        return []
    arm = cpu.arch in ("aarch64", "arm64")
    arm_features = {"NEON", "DOTPROD", "MATMUL_INT8", "SVE", "SME"}
    missing = []
    for part in llama_system_info.replace("\n", "|").split("|"):
        name, _, value = part.rpartition(":")[2].partition("=")
        name, value = name.strip(), value.strip()
        flag = LLAMA_FEATURE_FLAGS.get(name)
        if value != "1" or flag is None or (name in arm_features) != arm:
            continue
        if flag not in cpu.flags:
            missing.append(name)
    return missing


def llama_system_info() -> str:
    """llama.cpp's report of its compiled-in CPU features ("AVX2 = 1 | ...")."""
    import llama_cpp

    from runtime.gguf.llama_backends import load_llama_backends

    load_llama_backends()
    return llama_cpp.llama_print_system_info().decode(errors="replace")
