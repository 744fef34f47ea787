"""What a tuning result depends on: the CPU, GPU offload, the llama.cpp build and the model file.

A change of any of them makes the cached choice stale and the model is measured again:
another CPU (a VM moved to another host type, a resized VM) has other kernels and core
counts, another llama.cpp build other code paths, another model file other shapes.

The model file's sha256 is what identifies it. Hashing a multi-gigabyte file at every
load would cost seconds, so the cache keeps the file's identity (device, inode, size,
modification time) beside its digest and `model_digest` hashes again only when that
identity changed; a file laid out by the model store is a hard link of a blob named by
its digest, so its identity is stable until a new version replaces it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.files import sha256_file

#: CPU flags that select llama.cpp kernels (x86, then ARM); others do not change a result.
KERNEL_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512vbmi", "amx_tile", "amx_int8", "amx_bf16",
                "asimd", "asimddp", "asimdhp", "i8mm", "sve", "sve2", "sme", "bf16")


@dataclass(frozen=True)
class MachineParts:
    """The machine and build half of a fingerprint (the same for every model)."""

    cpu_model: str
    arch: str
    flags: tuple[str, ...]
    logical_cores: int
    gpu_offload: bool
    llama_cpp_version: str
    llama_system_info: str

    def to_json(self) -> dict[str, Any]:
        return {"cpu_model": self.cpu_model, "arch": self.arch, "flags": list(self.flags),
                "logical_cores": self.logical_cores, "gpu_offload": self.gpu_offload,
                "llama_cpp_version": self.llama_cpp_version, "llama_system_info": self.llama_system_info}

    def summary(self) -> str:
        """A short line for doctor: the CPU model and its notable instruction sets."""
        notable = [f.upper() for f in ("avx2", "avx512f", "amx_int8", "asimd", "sve") if f in self.flags]
        return (f"{self.cpu_model or self.arch} ({', '.join(notable) or 'no SIMD flags'}, {self.logical_cores} CPUs"
                f"{', GPU offload' if self.gpu_offload else ''}), llama-cpp-python {self.llama_cpp_version}")


def cpu_model_name(cpuinfo: str) -> str:
    """The CPU's model name from /proc/cpuinfo (x86 "model name"; ARM "CPU part" and "Hardware")."""
    found: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        found.setdefault(key.strip(), value.strip())
    if found.get("model name"):
        return found["model name"]
    parts = [f"{k} {found[k]}" for k in ("Hardware", "CPU implementer", "CPU part") if found.get(k)]
    return ", ".join(parts)


@functools.cache
def machine_parts() -> MachineParts:
    """This machine and this llama.cpp build, read once per process (loads llama.cpp)."""
    import llama_cpp

    from runtime.devices import describe_cpu, llama_gpu_offload_supported, llama_system_info

    cpu = describe_cpu()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        cpuinfo = ""
    return MachineParts(
        cpu_model=cpu_model_name(cpuinfo), arch=cpu.arch,
        flags=tuple(sorted(f for f in KERNEL_FLAGS if f in cpu.flags)), logical_cores=cpu.logical_cores,
        gpu_offload=llama_gpu_offload_supported(), llama_cpp_version=str(getattr(llama_cpp, "__version__", "?")),
        llama_system_info=llama_system_info().strip(),
    )


def file_identity(path: Path) -> list[int]:
    """What changes when the file at `path` is replaced or rewritten."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def model_digest(path: Path, known: dict[str, Any] | None = None) -> str:
    """The sha256 of the model file at `path`; `known` (a cache record's `model` part, with
    `identity` and `sha256`) saves the hashing when the file's identity has not changed."""
    if isinstance(known, dict) and known.get("identity") == file_identity(path) and known.get("sha256"):
        return str(known["sha256"])
    return sha256_file(path)


def fingerprint(parts: MachineParts, model_sha256: str) -> str:
    """One hex digest over everything the choice depends on."""
    body = json.dumps({"machine": parts.to_json(), "model_sha256": model_sha256}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()
