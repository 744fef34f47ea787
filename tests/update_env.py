"""What the signed-update tests share: a real hub repository with the demo models published,
an HTTP mirror of it that can misbehave on demand, releases built from the real demo
bundles, and a reader of the update topic.

The mirror stands in for "any HTTP server, CDN or S3-style store" the hub may sit
behind: by default it serves the repository's files with aiohttp's own file
response (Range, 206, Content-Range); for a path a test names it can throttle,
cut the connection, stream past the end, or serve another file's bytes, and it
counts what it sent. That is the network misbehaving, which a test cannot
otherwise arrange; the agent, the hub and the broker are the real ones.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web
from conftest import free_port
from mqtt_broker import MosquittoBroker, Watcher

from agent.cli.demo import DEMO_MODELS, EMBEDDING_MODEL, build_bundle
from agent.config import AgentConfig, ModelEntry, ServerConfig, TuningConfig
from runtime.bundle import read_bundle
from runtime.store import ModelStore
from sync.hub.publish import BundleSource, PublishResult, publish
from sync.hub.repository import HubRepository
from sync.mqtt import MqttSettings
from sync.update_settings import UpdateSettings

GROUP = "lab"
DEVICE = "dev-1"
PREFIX = "edgefleet/v1"
UPDATE_TOPIC = f"{PREFIX}/devices/{DEVICE}/update"
CMD_TOPIC = f"{PREFIX}/devices/{DEVICE}/cmd"
GROUP_DOORBELL = f"{PREFIX}/groups/{GROUP}/desired"
JOB_STEPS = ["queued", "downloading", "verifying", "staged", "activating", "health-check", "active"]


def make_release(
    source: Path,
    target: Path,
    version: str,
    *,
    onnx_note: str | None = None,
    toml: Callable[[str], str] | None = None,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """A new release of a real bundle: same files (copied), `version` in model.toml, and
    optionally new bytes in the ONNX model (a doc string appended as a protobuf field,
    which onnxruntime loads as it is) or in model.toml, or extra files."""
    source = source.resolve()
    target.mkdir(parents=True)
    for path in source.iterdir():
        shutil.copyfile(path, target / path.name)
    manifest = target / "model.toml"
    old = read_bundle(source).version
    text = manifest.read_text().replace(f'version = "{old}"', f'version = "{version}"')
    manifest.write_text(toml(text) if toml else text)
    if onnx_note is not None:
        note = onnx_note.encode()
        with open(target / "model.onnx", "ab") as handle:
            handle.write(b"\x32" + bytes([len(note)]) + note)  # ModelProto.doc_string
    for name, data in (extra or {}).items():
        (target / name).write_bytes(data)
    return target


@dataclass
class Behaviour:
    throttle_bps: int | None = None  # bytes per second, in pieces of at most that many bytes (1: trickle)
    cut_after: int | None = None  # bytes of body, first request only
    endless: bool = False
    serve_instead: Path | None = None
    ignore_range: bool = False
    stall_after: int | None = None  # bytes of body, then silence (first request only)
    cut_done: bool = False


@dataclass
class Mirror:
    """An HTTP server for the hub's repository directory."""

    root: Path
    port: int = field(default_factory=free_port)
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    ranges: dict[str, list[str | None]] = field(default_factory=dict)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def on(self, suffix: str, **kwargs: Any) -> Behaviour:
        """Misbehave for every path ending in `suffix` (e.g. a target file's hash-prefixed name)."""
        behaviour = Behaviour(**kwargs)
        self.behaviours[suffix] = behaviour
        return behaviour

    def clear(self) -> None:
        self.behaviours.clear()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{path:.+}", self._handle)
        self.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def __aenter__(self) -> Mirror:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rel = request.match_info["path"]
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root.resolve()) or not path.is_file():
            raise web.HTTPNotFound()
        self.ranges.setdefault(rel, []).append(request.headers.get("Range"))
        behaviour = next((b for s, b in self.behaviours.items() if rel.endswith(s)), None)
        if behaviour is None:
            self.sent[rel] = self.sent.get(rel, 0) + (
                path.stat().st_size if not request.http_range.start else path.stat().st_size - request.http_range.start
            )
            return web.FileResponse(path)
        data = (behaviour.serve_instead or path).read_bytes()
        start = 0 if behaviour.ignore_range else request.http_range.start or 0
        if start:
            response = web.StreamResponse(
                status=206, headers={"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            )
        else:
            response = web.StreamResponse(status=200)
        if not behaviour.endless:
            response.content_length = len(data) - start
        await response.prepare(request)
        chunk = min(64 * 1024, behaviour.throttle_bps or 64 * 1024)  # throttle_bps=1: a byte at a time
        offset = start
        while True:
            piece = (
                data[offset : offset + chunk] if offset < len(data) else (b"\0" * chunk if behaviour.endless else b"")
            )
            if not piece:
                break
            if behaviour.cut_after is not None and not behaviour.cut_done and offset + len(piece) > behaviour.cut_after:
                piece = piece[: behaviour.cut_after - offset]
                await response.write(piece)
                self.sent[rel] = self.sent.get(rel, 0) + len(piece)
                behaviour.cut_done = True
                assert request.transport is not None
                request.transport.abort()  # the connection drops mid-file
                return response
            if behaviour.stall_after is not None and not behaviour.cut_done and offset >= behaviour.stall_after:
                behaviour.cut_done = True
                while request.transport is not None and not request.transport.is_closing():
                    await asyncio.sleep(0.05)  # silence until the client gives up
                return response
            try:
                await response.write(piece)
            except ConnectionResetError:  # the client gave up (a deadline, a shutdown): so do we
                return response
            self.sent[rel] = self.sent.get(rel, 0) + len(piece)
            offset += len(piece)
            if behaviour.throttle_bps:
                await asyncio.sleep(len(piece) / behaviour.throttle_bps)
        await response.write_eof()
        return response


def embedding_state(root: Path) -> Path:
    """`root`/state: a model store holding the demo embedding model, as a device starts."""
    store = ModelStore(root / "state")
    store.ensure_layout()
    build_bundle(store, next(d for d in DEMO_MODELS if d.name == EMBEDDING_MODEL))
    return root


def create_hub(hub_dir: Path, state_dir: Path, models: tuple[str, ...]) -> HubRepository:
    """A hub with 2-of-2 root and targets keys, the demo bundles published for the group."""
    repo = HubRepository.create(hub_dir, key_counts={"root": 2, "targets": 2}, thresholds={"root": 2, "targets": 2})
    bundles = [BundleSource((state_dir / "models" / name / "current").resolve(), name) for name in models]
    publish(repo, "group", GROUP, bundles)
    return repo


def publish_release(
    repo: HubRepository, name: str, bundle: Path, scope: str = "group", target: str = GROUP
) -> PublishResult:
    return publish(repo, scope, target, [BundleSource(bundle, name)])  # type: ignore[arg-type]


def target_file(repo: HubRepository, name: str, version: str, file: str) -> Path:
    return repo.target_file_path(f"models/{name}/{version}/{file}")


def agent_config(
    state_dir: Path,
    hub_url: str,
    trust_root: Path,
    broker: MosquittoBroker | None,
    models: tuple[str, ...],
    **updates: Any,
) -> AgentConfig:
    settings = UpdateSettings(
        hub_url=hub_url,
        trust_root=str(trust_root),
        poll_interval_s=updates.pop("poll", 120.0),
        health_checks=2,
        health_check_interval_s=0.1,
        read_timeout_s=5.0,
        download_retries=updates.pop("retries", 3),
        min_free_mb=0,
    )
    settings = replace(settings, **updates)
    mqtt = (
        MqttSettings(
            host=broker.host, port=broker.port, device_id=DEVICE, group=GROUP, reconnect_min_s=0.2, reconnect_max_s=1.0
        )
        if broker
        else MqttSettings(device_id=DEVICE, group=GROUP)
    )
    return AgentConfig(
        state_dir=str(state_dir),
        server=replace(ServerConfig(), port=free_port()),
        models=[ModelEntry(name=m) for m in models],
        mqtt=mqtt,
        updates=settings,
        tuning=TuningConfig(mode="off"),  # no measuring beside the updates under test
    )


class UpdateLog:
    """The device's update topic as an operator's subscriber sees it."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher

    def all(self) -> list[dict[str, Any]]:
        out = []
        for message in self.watcher.on(UPDATE_TOPIC):
            try:
                out.append(json.loads(message.payload))
            except ValueError:
                continue
        return out

    def last_seq(self) -> int:
        return max((m.get("seq", 0) for m in self.all()), default=0)

    def since(self, seq: int) -> list[dict[str, Any]]:
        return [m for m in self.all() if m.get("seq", 0) > seq]

    async def until(
        self, seq: int, state: str | set[str], model: str | None = None, timeout_s: float = 60.0
    ) -> dict[str, Any]:
        """The first transition after `seq` into `state` (for `model`, when given)."""
        states = {state} if isinstance(state, str) else state
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            for message in self.since(seq):
                if message["state"] in states and (model is None or message.get("model") == model):
                    return message
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(
                    f"no {states} for {model} after seq {seq} within {timeout_s}s; "
                    f"saw {[(m['seq'], m['model'], m['state'], m['code']) for m in self.since(seq)]}"
                )
            await asyncio.sleep(0.05)

    def steps(self, seq: int, job: str) -> list[str]:
        return [m["state"] for m in sorted(self.since(seq), key=lambda m: m["seq"]) if m["job"] == job]
