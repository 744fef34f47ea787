"""A fleet simulator: many devices in one process, each running the agent's real sync stack.

Each simulated device is the agent minus inference and HTTP: its own state directory
with a `runtime.store.ModelStore`, a `runtime.registry.ModelRegistry`, and the agent's
own cleanup contexts run in the agent's order on a per-device (never served)
`aiohttp.web.Application`:

- `agent.fleet.updates.recovery_ctx` (the store's crash repair),
- `agent.fleet.link.mqtt_ctx` (its own `sync.mqtt.MqttLink`: birth, Last Will, persistent
  session, doorbell and cmd subscriptions),
- `agent.fleet.updates.updates_ctx` (`build_service`: `sync.tuf_client.HubClient`, the
  resumable downloader, `sync.updates.UpdateService`, the update reports),
- `agent.fleet.reported.reported_ctx` (the retained reported state), where it exists.

What is not real is the model: `StandInBackend` is registered for the ``onnx`` format in
`runtime.backend.BACKENDS` *in this process only*. Its load opens the model file and reads
its first and last 64 KiB (a 20 MB release costs the device its download, its two
hashings and its disk, not a model's RAM); its probe answers a finite tensor, except on
a device told to fail: a ``sim-device.json`` in the device's state directory lists the
versions whose probe returns NaN there (deterministic, chosen by the bench). Bundle
formats are a closed set (`runtime.bundle.Format`), so the stand-in takes over a known
format rather than bringing its own.

Run as a worker process by bench/bench_fleet.py (``python bench/fleet_sim.py CONFIG.json``):
it seeds and starts the devices CONFIG names, prints JSON lines on stdout (``ready``, then
one ``stats`` per ``stats`` line read on stdin) and stops every device on ``stop`` or EOF.
Telemetry is off: the bench measures the update path, not metrics traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from aiohttp import web  # noqa: E402

from agent.config import AgentConfig, ModelEntry  # noqa: E402
from agent.context import CONFIG, LIVE, LOADER, MODELS, MQTT, LiveState  # noqa: E402
from agent.fleet.link import mqtt_ctx  # noqa: E402
from agent.fleet.updates import UPDATES, recovery_ctx, updates_ctx  # noqa: E402
from runtime import backend as backends  # noqa: E402
from runtime.backend import BackendBase, Capability, JobContext, ModelInfo, TensorSpec  # noqa: E402
from runtime.bundle import MODEL_TOML, BundleManifest, ModelBundle, write_manifest  # noqa: E402
from runtime.devices import MachineSettings, describe_cpu  # noqa: E402
from runtime.errors import RuntimeLayerError  # noqa: E402
from runtime.registry import ModelRegistry  # noqa: E402
from runtime.scheduling.batching import BatchingSettings  # noqa: E402
from runtime.store import ModelStore  # noqa: E402
from sync.mqtt import MqttSettings  # noqa: E402
from sync.update_settings import UpdateSettings  # noqa: E402

Context = Callable[[web.Application], AsyncIterator[None]]

REPORTED: Context | None
try:  # the reported state (issue 23, spec §2); absent on older trees
    from agent.fleet.reported import reported_ctx as REPORTED
except ImportError:  # pragma: no cover - depends on the tree
    REPORTED = None

log = logging.getLogger("fleet_sim")

#: in a device's state directory: {"fail_probe": ["2", ...]} (versions whose probe fails there)
DEVICE_MARKER = "sim-device.json"
STAND_IN = "bench.fleet_sim:StandInBackend"
_TOUCH = 64 * 1024


# ---- the stand-in for inference -------------------------------------------------------------


class StandInBackend(BackendBase):
    """Loads by reading the model file's ends; answers a probe with a finite tensor, or with
    NaN on a device whose marker lists this version."""

    def __init__(self, bundle: ModelBundle, machine: MachineSettings) -> None:
        with open(bundle.weights, "rb") as handle:  # a missing or unreadable file fails the load
            handle.read(_TOUCH)
            size = os.fstat(handle.fileno()).st_size
            handle.seek(max(0, size - _TOUCH))
            handle.read(_TOUCH)
        self.fails = bundle.version in _marker(bundle).get("fail_probe", [])
        spec = (TensorSpec("x", "float32", (1, 4)),)
        self.info = ModelInfo(capabilities=frozenset({Capability.TENSOR}), platform="fleet-sim",
                              inputs=spec, outputs=(TensorSpec("y", "float32", (1, 4)),))

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None,
              ctx: JobContext) -> dict[str, np.ndarray]:
        return {"y": np.full((1, 4), np.nan if self.fails else 1.0, dtype=np.float32)}


def _marker(bundle: ModelBundle) -> dict[str, Any]:
    """The device's marker: `bundle` lies at <state_dir>/models/<name>/<version>."""
    path = bundle.path.resolve().parents[2] / DEVICE_MARKER
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def install_stand_in() -> None:
    """Serve every ``onnx`` bundle of this process with the stand-in."""
    backends.BACKENDS["onnx"] = STAND_IN


def write_release(directory: Path, version: str, size_bytes: int, note: str = "") -> Path:
    """A bundle the hub can sign: model.toml (onnx, task tensor) + `size_bytes` of random model.bin."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "model.bin", "wb") as handle:
        left = size_bytes
        while left > 0:
            piece = min(left, 1 << 20)
            handle.write(os.urandom(piece))
            left -= piece
    write_manifest(directory, BundleManifest(format="onnx", file="model.bin", task="tensor", version=version,
                                             description=note or f"fleet simulator release {version}"))
    return directory


def seed_device(state_dir: Path, name: str, bundle_dir: Path, fail_probe: list[str]) -> None:
    """A provisioned device: `bundle_dir` laid out, active and confirmed in its store."""
    store = ModelStore(state_dir)
    store.ensure_layout()
    files = {p.name: store.add_file(p) for p in sorted(bundle_dir.iterdir()) if p.is_file()}
    version = _version_of(bundle_dir)
    store.lay_out(name, version, files)
    if store.current(name) is None:
        store.activate(name, version, reason="provisioned by the fleet simulator")
        store.confirm(name, version)
    (state_dir / DEVICE_MARKER).write_text(json.dumps({"fail_probe": fail_probe}))


def _version_of(bundle_dir: Path) -> str:
    for line in (bundle_dir / MODEL_TOML).read_text().splitlines():
        if line.startswith("version = "):
            return line.split("=", 1)[1].strip().strip('"')
    raise ValueError(f"{bundle_dir}: no version in {MODEL_TOML}")


# ---- one device -------------------------------------------------------------------------------


@dataclass
class SimDevice:
    """One device: the agent's contexts on an app that is never served."""

    config: AgentConfig
    machine: MachineSettings
    app: web.Application = field(default_factory=web.Application)
    _stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    @property
    def device_id(self) -> str:
        return self.config.mqtt.device_id

    async def start(self) -> None:
        app = self.app
        app[CONFIG] = self.config
        app[LIVE] = LiveState(self.config)
        await self._enter(recovery_ctx)
        registry = ModelRegistry(self.machine, max_pending=4, drain_timeout_s=1.0)
        app[MODELS] = registry
        self._stack.push_async_callback(registry.close)
        app[LOADER] = asyncio.create_task(self._load_configured(registry), name=f"load:{self.device_id}")
        await self._enter(mqtt_ctx)
        await self._enter(updates_ctx)
        if REPORTED is not None:
            await self._enter(REPORTED)

    async def _enter(self, ctx: Context) -> None:
        await self._stack.enter_async_context(contextlib.asynccontextmanager(ctx)(self.app))

    async def _load_configured(self, registry: ModelRegistry) -> None:
        store = ModelStore(self.config.state_dir)
        for entry in self.config.models:
            if store.current(entry.name) is not None:
                with contextlib.suppress(RuntimeLayerError):  # shown as failed, as the agent does
                    await registry.load(store.bundle(entry.name))

    async def stop(self) -> None:
        await self._stack.aclose()

    def stats(self, model: str) -> dict[str, Any]:
        service = self.app.get(UPDATES)
        link = self.app.get(MQTT)
        registry = self.app[MODELS]
        serving = {s.name: s.version for s in registry.serving()}
        out: dict[str, Any] = {
            "device": self.device_id,
            "active": serving.get(model),
            "connected": bool(link and link.connected),
            "connects": link.status.connects if link else 0,
            "disconnects": link.status.disconnects if link else 0,
            "dropped_inbound": link.status.dropped_inbound if link else 0,
        }
        if service is not None:
            out.update(
                jobs=service.status()["jobs"],
                reports_pending=service.reporter.pending,
                reports_sent=service.reporter.sent,
                downloaded=sum(s.bytes_received for s in service.download_stats.values()),
                requests=sum(s.requests for s in service.download_stats.values()),
                reconciled=service.reconciled.is_set(),
            )
        return out


def device_config(spec: dict[str, Any], common: dict[str, Any]) -> AgentConfig:
    mqtt = MqttSettings(host=common["broker_host"], port=common["broker_port"], device_id=spec["id"],
                        group=common["group"], topic_prefix=common["prefix"],
                        reconnect_min_s=common.get("reconnect_min_s", 0.5),
                        reconnect_max_s=common.get("reconnect_max_s", 5.0))
    updates = UpdateSettings(hub_url=common["hub_url"], trust_root=common["trust_root"],
                             **common.get("updates", {}))
    return AgentConfig(state_dir=spec["state_dir"], models=[ModelEntry(name=common["model"])], mqtt=mqtt,
                       updates=updates, batching=BatchingSettings(onnx_max_batch=1))


# ---- the worker process -------------------------------------------------------------------------


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _rss() -> int:
    return psutil.Process().memory_info().rss


async def run_worker(config: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    # One process carries many devices; each real agent has its own default pool (to_thread:
    # hashing, fsync, loads). Give this process one that size of pool per few devices.
    loop.set_default_executor(ThreadPoolExecutor(max_workers=config.get("threads", 32)))
    install_stand_in()
    rss_base = _rss()
    machine = MachineSettings(cpu=describe_cpu(), batching=BatchingSettings(onnx_max_batch=1))
    common = config["common"]
    specs = config["devices"]
    started = time.monotonic()
    await asyncio.gather(*(asyncio.to_thread(seed_device, Path(s["state_dir"]), common["model"],
                                             Path(common["base_bundle"]), s.get("fail_probe", []))
                           for s in specs))
    devices = [SimDevice(device_config(s, common), machine) for s in specs]
    gate = asyncio.Semaphore(config.get("start_concurrency", 50))

    async def start(device: SimDevice) -> None:
        async with gate:
            await device.start()

    await asyncio.gather(*(start(d) for d in devices))
    deadline = time.monotonic() + config.get("ready_timeout_s", 300)
    while time.monotonic() < deadline:  # every device connected and through its first look at the hub
        stats = [d.stats(common["model"]) for d in devices]
        if all(s.get("reconciled") and s["connected"] for s in stats):
            break
        await asyncio.sleep(0.2)
    _emit("ready", devices=len(devices), seconds=round(time.monotonic() - started, 2), rss_base=rss_base,
          rss=_rss(), reported=REPORTED is not None,
          not_ready=[d.device_id for d in devices if not d.stats(common["model"]).get("reconciled")])
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().strip()
        if line == "stats":
            _emit("stats", rss=_rss(), cpu=sum(psutil.Process().cpu_times()[:2]),
                  devices=[d.stats(common["model"]) for d in devices])
        elif line in ("stop", ""):
            break
    stopping = time.monotonic()
    await asyncio.gather(*(d.stop() for d in devices), return_exceptions=True)
    _emit("stopped", seconds=round(time.monotonic() - stopping, 2))


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    logging.basicConfig(level=config.get("log_level", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    asyncio.run(run_worker(config))


if __name__ == "__main__":
    main()
