"""`edgefleet doctor`: is this machine and this config ready to serve, and if not, what to fix.

Each check is a function returning `Finding`s, reading the machine through
paths it is given (``/sys/class/powercap``, the state dir), so a test can point
it at a fake sysfs tree. The decisions themselves (which llama.cpp path, which
onnxruntime providers) come from runtime/devices.py, the same code the agent
runs at load; doctor only reports them. The checks that go over the network
(ports, the MQTT broker, the hub) are in agent/cli/doctor_network.py. Exit status: 0 when nothing failed
(warnings are allowed), 1 otherwise.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from agent.cli.doctor_network import check_mqtt, check_ports, check_updates
from agent.cli.doctor_tls import check_tls
from agent.cli.doctor_tuning import check_tuning
from agent.cli.findings import Finding, Level
from agent.config import AgentConfig
from runtime.bundle import read_bundle
from runtime.errors import RuntimeLayerError

POWERCAP = Path("/sys/class/powercap")
#: Below this much free space in the state dir a model update cannot be staged.
DISK_FAIL_BYTES = 512 * 1024 * 1024
DISK_WARN_BYTES = 4 * 1024 * 1024 * 1024


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


def check_device_key(config: AgentConfig) -> list[Finding]:
    """The key that signs the audit log's checkpoints (security/device_key.py), parsed as the
    agent parses it at its first checkpoint; never made here."""
    from security.device_key import KEY_NAME, load_or_create_device_key, precheck_device_key

    if not config.audit.enabled:
        return []
    path = Path(config.state_dir) / KEY_NAME
    problem, warning = precheck_device_key(path)
    if problem is None and path.exists():
        try:
            load_or_create_device_key(path.parent)
        except (OSError, ValueError) as exc:
            problem = str(exc)
    if problem is not None:
        return [Finding(Level.FAIL, "device key", f"{problem}: audit checkpoints are not signed (each one is "
                        "lost and counted in edgefleet_audit_dropped_total)",
                        "restore the key from the state dir's backup (a new key is a new identity: the hub "
                        "must be given its public half)")]
    if warning is not None:
        return [Finding(Level.WARN, "device key", warning, f"chmod 600 {path}")]
    detail = f"{path}" if path.exists() else f"none yet: made at the agent's first audit checkpoint ({path})"
    return [Finding(Level.OK, "device key", detail)]


def check_state_dir(state_dir: Path) -> list[Finding]:
    """The checks `serve` makes before it starts (runtime/state_lock.py), said as findings; a state
    dir that does not exist yet is fine when the agent can make it at its first start."""
    from runtime.state_lock import StateDirError, holder
    from runtime.state_lock import check_state_dir as usable

    try:
        usable(state_dir)
    except StateDirError as exc:
        detail, _, fix = str(exc).partition("; ")
        return [Finding(Level.FAIL, "state dir", detail.removeprefix("state dir "),
                        fix or "set state_dir to a directory the agent's user owns")]
    findings = []
    if not state_dir.exists():
        findings.append(Finding(Level.OK, "state dir", f"{state_dir} does not exist yet; the agent makes it "
                                "at its first start"))
    else:
        held = holder(state_dir)
        running = f", in use by the running agent (pid {held[0]})" if held and held[0] else ""
        findings.append(Finding(Level.OK, "state dir", f"{state_dir}: readable and writable{running}"))
    existing = next(p for p in (state_dir, *state_dir.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    text = f"{free / 2**30:.1f} GiB free in {state_dir}"
    if free < DISK_FAIL_BYTES:
        findings.append(Finding(Level.FAIL, "disk", text, "free space: a model update needs room to stage"))
    elif free < DISK_WARN_BYTES:
        findings.append(Finding(Level.WARN, "disk", text, "model updates may not fit"))
    else:
        findings.append(Finding(Level.OK, "disk", text))
    return findings


def check_telemetry_outbox(state_dir: Path) -> list[Finding]:
    """Telemetry records lost while the disk refused the outbox (kept in the outbox itself);
    nothing while there is no outbox (no [mqtt], or never started)."""
    from sync.telemetry import Outbox, OutboxStorageError

    try:
        if not (state_dir / "outbox" / "telemetry.sqlite3").is_file():
            return []
    except OSError:  # a state dir it cannot read: the state dir check says so
        return []
    outbox = Outbox(state_dir / "outbox")
    try:
        stats = outbox.stats()
    except OutboxStorageError as exc:
        return [Finding(Level.WARN, "telemetry", f"cannot read the outbox: {exc}",
                        "run doctor as the agent's user, and keep free space in the state dir")]
    finally:
        outbox.close()
    if stats.lost:
        return [Finding(Level.WARN, "telemetry", f"{stats.lost} telemetry records were lost: the disk refused the "
                        f"outbox while the broker was away ({stats.queued} waiting now)",
                        f"keep free space in {state_dir}; edgefleet_telemetry_records_lost_total counts them")]
    return [Finding(Level.OK, "telemetry", f"{stats.queued} records waiting for the broker, none lost")]


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
        except OSError as exc:  # a folder the agent's user may not read
            findings.append(Finding(Level.FAIL, f"model {entry.name}", f"cannot read {exc.filename or path}: "
                                    f"{exc.strerror}", "give the state dir to the user the agent runs as"))
        else:
            findings.append(Finding(Level.OK, f"model {entry.name}",
                                    f"{bundle.manifest.format} {bundle.version}, {bundle.size_bytes() / 1e6:.0f} MB"))
    return findings


def check_keys(config: AgentConfig) -> list[Finding]:
    from agent.lifecycle.service import is_loopback
    from security.keys_file import KeyFileError, read_keys_file

    path = config.api_keys_path()
    try:
        document = read_keys_file(path)
    except KeyFileError as exc:
        return [Finding(Level.FAIL, "api keys", f"{exc}; a running agent keeps the keys it had (a reload "
                        "refuses this file), a starting one refuses to start",
                        "fix the file (edgefleet keys list shows what it reads) and reload the agent")]
    if document is not None:
        active = sum(1 for k in document.keys if not k.revoked)
        return [Finding(Level.OK, "api keys", f"{path}: {active} key(s) in force, {len(document.certs)} "
                        f"certificate subject(s){'; server.api_key too' if config.server.api_key else ''}")]
    if config.server.api_key:
        return [Finding(Level.OK, "api key", "set")]
    if is_loopback(config.server.host):
        return [Finding(Level.OK, "api key", "none; the agent listens on loopback only")]
    return [Finding(Level.FAIL, "api key", f"none, and the agent listens on {config.server.host}",
                    "add keys (edgefleet keys add NAME --scope infer), set server.api_key, or listen on 127.0.0.1")]


def diagnose(load_config: Callable[[], AgentConfig], powercap: Path = POWERCAP) -> list[Finding]:
    """Every check, in the order an operator fixes things."""
    findings = [*check_cpu(), *check_gpu_providers(), *check_energy(powercap)]
    try:
        config = load_config()
    except Exception as exc:  # noqa: BLE001 - the CLI's config errors carry the one line to show
        return [*findings, Finding(Level.FAIL, "config", str(exc), "fix the config file; the message names the key")]
    findings.append(Finding(Level.OK, "config", "valid"))
    findings += check_keys(config)
    findings += check_ports(config)
    findings += check_tls(config)
    findings += check_state_dir(Path(config.state_dir))
    findings += check_device_key(config)
    findings += check_telemetry_outbox(Path(config.state_dir))
    findings += check_models(config)
    findings += check_tuning(config)
    findings += check_mqtt(config.mqtt)
    findings += check_updates(config)
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
