"""An agent imports only what its config switches on (issue 29, part 5).

Each case starts a real `edgefleet serve` process under ``python -X importtime``, so
its stderr holds the interpreter's own record of every module the process imported,
and reads /proc/PID/maps for the native libraries it mapped. Once it is ready and
has answered the endpoints an operator checks first, the test asserts which heavy
packages it holds: none of them with nothing configured (not even cryptography: the audit
log, on by default, loads the device key at its first checkpoint), paho once ``[mqtt]``
points at a real mosquitto, grpc once the gRPC port is on.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from conftest import free_port
from mqtt_broker import MosquittoBroker
from service_process import ServiceProcess, write_config

#: Packages that a feature brings in; an agent without that feature must not import them.
HEAVY = ("numpy", "tuf", "securesystemslib", "paho", "grpc", "google", "urllib3", "onnxruntime", "llama_cpp",
         "tokenizers", "jinja2", "tqdm")
#: Native libraries of the heavy packages, as they appear in /proc/PID/maps.
NATIVE = {"numpy": "_multiarray_umath", "cryptography": "_rust.abi3.so", "grpc": "cygrpc",
          "onnxruntime": "onnxruntime_pybind11_state", "llama_cpp": "libllama"}
#: Bound on an idle agent's resident memory: a guard against gross regressions, not a target.
IDLE_RSS_BOUND_MIB = 60  # about 45 MiB with the defaults on a 2-core Xeon VM (docs/performance.md), 82 before


def imported_packages(log: str) -> set[str]:
    """Top-level packages named by ``-X importtime`` lines ("import time: self | cumulative | name")."""
    names = set()
    for line in log.splitlines():
        if line.startswith("import time:") and "|" in line and "[us]" not in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def mapped_natives(pid: int) -> set[str]:
    """Which of NATIVE's libraries the process has mapped."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {package for package, library in NATIVE.items() if library in maps}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def _serve(tmp_path: Path, extra: str = "", server: str = "") -> tuple[ServiceProcess, str]:
    """A real agent with no models, run under ``-X importtime``; `extra` is TOML before the
    ``[server]`` table, `server` more keys in it."""
    port = free_port()
    config = write_config(tmp_path / "agent.toml", tmp_path / "state", port, [], extra=extra)
    config.write_text(config.read_text().replace("[server]\n", f"[server]\n{server}\n"))
    agent = ServiceProcess(config, tmp_path, command=[sys.executable, "-X", "importtime", "-m", "agent"])
    await agent.notify.wait_for("READY", "1", timeout=60)
    return agent, f"http://127.0.0.1:{port}"


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read().decode()


async def test_an_agent_with_nothing_configured_imports_no_heavy_package(tmp_path: Path) -> None:
    agent, url = await _serve(tmp_path)
    try:
        # what an operator checks first still answers with nothing loaded
        assert _get(url + "/healthz")[0] == 200
        assert _get(url + "/readyz")[0] == 200
        status, body = _get(url + "/v1/models")
        assert status == 200 and json.loads(body)["data"] == [], body
        status, metrics = _get(url + "/metrics")
        assert status == 200 and "edgefleet_" in metrics
        imported = imported_packages(agent.log())
        assert "aiohttp" in imported  # the record is there at all
        assert sorted(imported & set(HEAVY)) == []
        assert "cryptography" not in imported and mapped_natives(agent.proc.pid) == set()
        assert not (tmp_path / "state" / "device-key.pem").exists()  # made at the first checkpoint
        assert rss_mib(agent.proc.pid) < IDLE_RSS_BOUND_MIB
    finally:
        agent.stop()


async def test_with_audit_off_not_even_cryptography_is_imported(tmp_path: Path) -> None:
    agent, url = await _serve(tmp_path, extra="[audit]\nenabled = false")
    try:
        assert _get(url + "/readyz")[0] == 200
        assert "cryptography" not in imported_packages(agent.log())
        assert mapped_natives(agent.proc.pid) == set()
    finally:
        agent.stop()


async def test_mqtt_configured_brings_paho_and_nothing_else_heavy(tmp_path: Path,
                                                                   mqtt_broker: MosquittoBroker) -> None:
    extra = f'[mqtt]\nhost = "{mqtt_broker.host}"\nport = {mqtt_broker.port}\ndevice_id = "idle-1"'
    agent, url = await _serve(tmp_path, extra=extra)
    try:
        assert _get(url + "/readyz")[0] == 200
        imported = imported_packages(agent.log())
        assert "paho" in imported
        assert sorted(imported & set(HEAVY) - {"paho"}) == []
    finally:
        agent.stop()


async def test_grpc_port_brings_grpc(tmp_path: Path) -> None:
    agent, url = await _serve(tmp_path, server=f"grpc_port = {free_port()}")
    try:
        assert _get(url + "/readyz")[0] == 200
        imported = imported_packages(agent.log())
        assert "grpc" in imported and "grpc" in mapped_natives(agent.proc.pid)
        assert sorted(imported & set(HEAVY) - {"grpc", "google", "numpy"}) == []
    finally:
        agent.stop()


async def test_the_audit_log_loads_the_device_key_at_its_first_checkpoint(tmp_path: Path) -> None:
    agent, url = await _serve(tmp_path, extra="[audit]\ncheckpoint_every = 1")
    try:
        assert _get(url + "/readyz")[0] == 200
        key = tmp_path / "state" / "device-key.pem"
        assert not key.exists() and "cryptography" not in mapped_natives(agent.proc.pid)
        agent.signal(signal.SIGHUP)  # a config reload is audited: its record is sealed at once
        for _ in range(200):
            if key.exists() and "cryptography" in mapped_natives(agent.proc.pid):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no device key made at the first checkpoint")
        assert key.stat().st_mode & 0o777 == 0o600
    finally:
        agent.stop()
    done = subprocess.run([sys.executable, "-m", "agent", "audit", "verify", "--state-dir", str(tmp_path / "state")],
                          capture_output=True, text=True, timeout=60, check=False, env={**os.environ,
                                                                                        "EDGEFLEET_CONFIG": ""})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "checkpoints signed by ed25519:" in done.stdout and " 0 checkpoints" not in done.stdout, done.stdout
