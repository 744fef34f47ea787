"""`edgefleet doctor`: is this machine and this config ready to serve, and if not, what to fix.

Each check is a function returning `Finding`s, reading the machine through
paths it is given (``/sys/class/powercap``, the state dir), so a test can point
it at a fake sysfs tree. The decisions themselves (which llama.cpp path, which
onnxruntime providers) come from runtime/devices.py, the same code the agent
runs at load; doctor only reports them. Exit status: 0 when nothing failed
(warnings are allowed), 1 otherwise.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TextIO

from agent.config import AgentConfig
from runtime.bundle import read_bundle
from runtime.errors import RuntimeLayerError

POWERCAP = Path("/sys/class/powercap")
#: Below this much free space in the state dir a model update cannot be staged.
DISK_FAIL_BYTES = 512 * 1024 * 1024
DISK_WARN_BYTES = 4 * 1024 * 1024 * 1024


class Level(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Finding:
    level: Level
    check: str
    detail: str
    fix: str = ""


def check_cpu() -> list[Finding]:
    from runtime.devices import (
        choose_llama_placement,
        describe_cpu,
        llama_gpu_offload_supported,
        llama_system_info,
        missing_cpu_features,
    )

    cpu = describe_cpu()
    interesting = ("avx2", "avx512f", "avx512_vnni", "amx_int8", "asimd", "asimddp", "i8mm", "sve", "sme")
    have = [flag for flag in interesting if flag in cpu.flags]
    findings = [Finding(Level.OK, "cpu", f"{cpu.arch}, {cpu.physical_cores} physical / {cpu.logical_cores} "
                        f"logical cores, features: {', '.join(have) or 'none of ' + ', '.join(interesting)}")]
    if cpu.arch in ("x86_64", "amd64") and "avx2" not in cpu.flags:
        findings.append(Finding(Level.WARN, "cpu", "no AVX2: llama.cpp runs its slow generic kernels",
                                "expect a few tokens per second; prefer a smaller model"))
    try:
        gpu = llama_gpu_offload_supported()
    except Exception as exc:  # noqa: BLE001 - an import failure is the finding
        return [*findings, Finding(Level.FAIL, "llama.cpp", f"cannot load llama-cpp-python: {exc}",
                                   "reinstall the package (the wheel does not match this CPU or libc)")]
    missing = missing_cpu_features(llama_system_info(), cpu)
    if missing:
        findings.append(Finding(Level.FAIL, "llama.cpp", f"built for CPU features this CPU lacks: "
                                f"{', '.join(missing)}; GGUF models would crash the agent (SIGILL)",
                                "install the portable package (packaging/build-deb.sh --portable builds "
                                "llama.cpp with GGML_NATIVE=OFF and all CPU variants)"))
    placement = choose_llama_placement(cpu, gpu_offload_supported=gpu)
    findings.append(Finding(Level.OK, "llama.cpp", "; ".join(placement.reasons)))
    return findings


def check_gpu_providers() -> list[Finding]:
    from runtime.devices import ONNX_PROVIDER_PREFERENCE, onnx_available_providers

    try:
        providers = onnx_available_providers()
    except Exception as exc:  # noqa: BLE001
        return [Finding(Level.FAIL, "onnxruntime", f"cannot load onnxruntime: {exc}", "reinstall the package")]
    accelerated = [p for p in providers if p in ONNX_PROVIDER_PREFERENCE and p != "CPUExecutionProvider"]
    detail = f"providers: {', '.join(providers)}"
    if accelerated:
        return [Finding(Level.OK, "onnxruntime", detail)]
    return [Finding(Level.OK, "onnxruntime", detail + " (CPU only; a GPU build of onnxruntime adds CUDA)")]


def check_energy(powercap: Path = POWERCAP) -> list[Finding]:
    """RAPL counters: present, and readable by this user (root-only since Linux 5.10)."""
    counters = sorted(powercap.glob("*/energy_uj")) if powercap.is_dir() else []
    if not counters:
        return [Finding(Level.WARN, "energy", f"no RAPL energy counters under {powercap}",
                        "energy is not measured on this machine (no intel_rapl driver, a VM, or not x86)")]
    unreadable = [c for c in counters if not os.access(c, os.R_OK)]
    if unreadable:
        return [Finding(Level.FAIL, "energy", f"{len(unreadable)} of {len(counters)} energy counters are not "
                        f"readable by this user: {unreadable[0]}",
                        "let group edgefleet read them: systemd-tmpfiles --create "
                        "/usr/lib/tmpfiles.d/edgefleet.conf (the package does this at boot), "
                        "and run the agent in that group")]
    return [Finding(Level.OK, "energy", f"{len(counters)} RAPL counters readable")]


def check_state_dir(state_dir: Path) -> list[Finding]:
    if not state_dir.is_dir():
        return [Finding(Level.FAIL, "state dir", f"{state_dir} does not exist",
                        f"create it (mkdir -p {state_dir}) or set state_dir in the config")]
    findings = []
    if not os.access(state_dir, os.W_OK):
        findings.append(Finding(Level.FAIL, "state dir", f"{state_dir} is not writable by this user",
                                f"chown it to the agent's user (chown -R edgefleet: {state_dir})"))
    free = shutil.disk_usage(state_dir).free
    text = f"{free / 2**30:.1f} GiB free in {state_dir}"
    if free < DISK_FAIL_BYTES:
        findings.append(Finding(Level.FAIL, "disk", text, "free space: a model update needs room to stage"))
    elif free < DISK_WARN_BYTES:
        findings.append(Finding(Level.WARN, "disk", text, "model updates may not fit"))
    else:
        findings.append(Finding(Level.OK, "disk", text))
    return findings


def check_models(config: AgentConfig) -> list[Finding]:
    if not config.models:
        return [Finding(Level.WARN, "models", "no models configured",
                        "add [[models]] entries to the config (see docs/configuration.md)")]
    findings = []
    for entry in config.models:
        path = config.bundle_path(entry)
        try:
            bundle = read_bundle(path, name=entry.name)
        except RuntimeLayerError as exc:
            findings.append(Finding(Level.FAIL, f"model {entry.name}", str(exc),
                                    f"put the bundle at {path} (see docs/configuration.md, Model bundles)"))
        else:
            findings.append(Finding(Level.OK, f"model {entry.name}",
                                    f"{bundle.manifest.format} {bundle.version}, {bundle.size_bytes() / 1e6:.0f} MB"))
    return findings


def check_keys(config: AgentConfig) -> list[Finding]:
    from agent.lifecycle.service import is_loopback

    if config.server.api_key:
        return [Finding(Level.OK, "api key", "set")]
    if is_loopback(config.server.host):
        return [Finding(Level.OK, "api key", "none; the agent listens on loopback only")]
    return [Finding(Level.FAIL, "api key", f"none, and the agent listens on {config.server.host}",
                    "set server.api_key, or listen on 127.0.0.1")]


def diagnose(load_config: Callable[[], AgentConfig], powercap: Path = POWERCAP) -> list[Finding]:
    """Every check, in the order an operator fixes things."""
    findings = [*check_cpu(), *check_gpu_providers(), *check_energy(powercap)]
    try:
        config = load_config()
    except Exception as exc:  # noqa: BLE001 - the CLI's config errors carry the one line to show
        return [*findings, Finding(Level.FAIL, "config", str(exc), "fix the config file; the message names the key")]
    findings.append(Finding(Level.OK, "config", "valid"))
    findings += check_keys(config)
    findings += check_state_dir(Path(config.state_dir))
    findings += check_models(config)
    return findings


def report(findings: Iterable[Finding], out: TextIO) -> int:
    failed = 0
    for f in findings:
        out.write(f"[{f.level.value:4}] {f.check}: {f.detail}\n")
        if f.fix and f.level is not Level.OK:
            out.write(f"       fix: {f.fix}\n")
        failed += f.level is Level.FAIL
    out.write("no problems found\n" if not failed else f"{failed} problem(s) to fix\n")
    return 1 if failed else 0


def run_doctor(load_config: Callable[[], AgentConfig]) -> int:
    return report(diagnose(load_config), sys.stdout)
