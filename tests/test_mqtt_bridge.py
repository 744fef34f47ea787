"""A site broker bridged to a central one, and the site's uplink cut for a while.

The topology of docs/operations.md ("Brokers"): agents connect to a mosquitto on
their site; that broker bridges ``edgefleet/v1/#`` both ways (QoS 1, persistent
bridge session, persistence on, a generous queue) to a central mosquitto where
the hub and the rollout controller publish and the operator watches. The uplink is
cut for real: an iptables rule on this machine drops every packet to and from the
central broker's bridge listener, while the hub keeps its own listener. During the
cut the operator starts a rollout and the agent keeps sending telemetry; after it,
the release reaches the agent, the rollout completes, and the central side has every
update report and every telemetry record sent meanwhile, none missing (``seq`` has
no gap).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import EMBED, RunningAgent, free_port, start_agent
from mqtt_broker import MosquittoBroker, Watcher
from update_env import DEVICE, GROUP, JOB_STEPS, UPDATE_TOPIC, agent_config, create_hub, embedding_state, make_release

from agent.config import TelemetryConfig
from sync.hub.server import hub_app

REPO = Path(__file__).resolve().parent.parent
IPTABLES = shutil.which("iptables")
TELEMETRY_TOPIC = f"edgefleet/v1/devices/{DEVICE}/telemetry"
STATE_TOPIC = f"edgefleet/v1/devices/{DEVICE}/state"
#: How long the uplink stays cut: several telemetry records, and longer than the bridge's keepalive.
CUT_S = 12.0


def iptables_usable() -> bool:
    if IPTABLES is None or os.geteuid() != 0:
        return False
    return subprocess.run([IPTABLES, "-w", "-S", "INPUT"], capture_output=True, check=False).returncode == 0


pytestmark = pytest.mark.skipif(not iptables_usable(),
                                reason="cutting the bridge needs iptables and root (the uplink is cut for real)")


class Uplink:
    """The site's uplink to the central broker's bridge port, cut with iptables rules that drop
    every packet to and from that port, as a dead line does (nobody is told: the bridge finds
    out by its keepalive)."""

    def __init__(self, port: int) -> None:
        tag = ["-m", "comment", "--comment", f"edgefleet-test-bridge-{port}", "-j", "DROP"]
        self.rules = [["INPUT", "-i", "lo", "-p", "tcp", direction, str(port), *tag]
                      for direction in ("--dport", "--sport")]
        self.cut_now = False

    def cut(self) -> None:
        assert IPTABLES is not None
        self.cut_now = True
        for rule in self.rules:
            subprocess.run([IPTABLES, "-w", "-I", *rule], check=True)

    def restore(self) -> None:
        assert IPTABLES is not None
        if self.cut_now:
            for rule in self.rules:
                subprocess.run([IPTABLES, "-w", "-D", *rule], check=False)
            self.cut_now = False


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = embedding_state(tmp_path_factory.mktemp("bridge"))
    create_hub(root / "hub", root / "state", (EMBED,))
    return root


def site_config(bridge_port: int) -> str:
    """docs/operations.md's bridge config, pointed at the central broker here: no TLS or
    password, a 5 s keepalive and 1-2 s reconnects (to keep the test short); persistence is
    the broker helper's (its own directory)."""
    page = (REPO / "docs/operations.md").read_text()
    block = page.split("```conf\n# /etc/mosquitto/conf.d/edgefleet-bridge.conf", 1)[1].split("```", 1)[0]
    dropped = ("persistence ", "remote_username ", "remote_password ", "bridge_cafile ")
    lines = [line for line in block.strip().splitlines()[1:] if not line.startswith(dropped)]
    replaced = {"address": f"address 127.0.0.1:{bridge_port}", "keepalive_interval": "keepalive_interval 5",
                "restart_timeout": "restart_timeout 1 2"}
    lines = [replaced.get(line.split()[0], line) for line in lines]
    assert "topic edgefleet/v1/# both 1" in lines and "cleansession false" in lines, lines
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def brokers(env: Path) -> Iterator[tuple[MosquittoBroker, MosquittoBroker, Uplink]]:
    """(central, site, uplink): central listens for the hub and, on a second port, for the bridge."""
    hub_port, bridge_port = free_port(), free_port()
    central = MosquittoBroker(env, port=hub_port, persistence_dir=env / "central-db", extra_config=(
        f"listener {hub_port} 127.0.0.1\nlistener {bridge_port} 127.0.0.1\nallow_anonymous true\n"
        "max_queued_messages 100000\n"))
    site = MosquittoBroker(env, persistence_dir=env / "site-db", extra_config=site_config(bridge_port))
    uplink = Uplink(bridge_port)
    central.start()
    site.start()
    try:
        yield central, site, uplink
    finally:
        uplink.restore()
        site.stop()
        central.stop()


@pytest.fixture(scope="module")
async def hub_url(env: Path) -> AsyncIterator[str]:
    runner = web.AppRunner(hub_app(env / "hub" / "repository"))  # what `edgefleet hub serve` runs
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture(scope="module")
async def agent(env: Path, brokers: tuple[MosquittoBroker, MosquittoBroker, Uplink],
                hub_url: str) -> AsyncIterator[RunningAgent]:
    _, site, _ = brokers
    config = agent_config(env / "state", hub_url, env / "hub/trust-root.json", site, (EMBED,))
    config = replace(config, telemetry=replace(TelemetryConfig(), interval_s=1.0, energy_sample_s=0.5))
    async with start_agent(config) as running:
        yield running


def seqs(watcher: Watcher) -> list[int]:
    return [r["seq"] for r in records(watcher)]


async def served_version(agent: RunningAgent) -> str:
    status, meta = await agent.get(f"/v2/models/{EMBED}")
    assert status == 200, meta
    return str(meta["versions"][0])


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.2)


async def test_a_cut_uplink_loses_neither_the_release_nor_telemetry(
        env: Path, brokers: tuple[MosquittoBroker, MosquittoBroker, Uplink], agent: RunningAgent) -> None:
    central, _, uplink = brokers
    with contextlib.ExitStack() as stack, Watcher(central, TELEMETRY_TOPIC, UPDATE_TOPIC, STATE_TOPIC) as watcher:
        # the bridge carries the agent's birth and telemetry to the central broker
        await watcher.wait(STATE_TOPIC, timeout_s=60)
        await watcher.wait(TELEMETRY_TOPIC, timeout_s=60)
        first = await served_version(agent)

        # the rollout controller runs at the center, beside the hub
        control = subprocess.Popen([sys.executable, "-m", "agent", "hub", "control", "--hub", str(env / "hub"),
                                    "--mqtt", f"{central.host}:{central.port}", "--interval", "0.5s"], cwd=REPO,
                                   stdout=(env / "control.log").open("wb"), stderr=subprocess.STDOUT)
        stack.callback(lambda: (control.terminate(), control.wait(30)))
        await asyncio.sleep(2)  # it has read the fleet

        uplink.cut()
        release = make_release(env / "state/models" / EMBED / "current", env / "emb-2", "2",
                               onnx_note="edgefleet release 2 behind a bridge")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "hub", "rollout", "start", "--hub", str(env / "hub"), "--group", GROUP,
            f"{EMBED}={release}", "--steps", "100", "--wait", "1s", "--min-devices", "1",
            "--mqtt", f"{central.host}:{central.port}", cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, out.decode()
        rollout_id = re.search(r"rollout (r-[0-9a-f]+) started", out.decode()).group(1)  # type: ignore[union-attr]
        cut_at = time.time()
        await asyncio.sleep(CUT_S)
        # the doorbell waits at the central broker: the agent has not heard of the release
        assert await served_version(agent) == first
        before_cut = max(seqs(watcher), default=0)
        uplink.restore()
        restored_at = time.time()

        await until(lambda: any(json.loads(m.payload).get("state") == "active"
                                and json.loads(m.payload).get("version") == "2" for m in watcher.on(UPDATE_TOPIC)),
                    "the release did not reach the agent after the uplink came back", 120)
        assert await served_version(agent) == "2"
        # the rollout goes on and completes, and every report of the job crossed the bridge, in order
        await until(lambda: rollout_state(env, rollout_id) == "completed", "the rollout did not complete", 120)
        reports = [json.loads(m.payload) for m in watcher.on(UPDATE_TOPIC)]
        job = next(r["job"] for r in reports if r.get("version") == "2" and r["state"] == "active")
        assert [r["state"] for r in reports if r["job"] == job] == JOB_STEPS, reports
        report_seqs = sorted({r["seq"] for r in reports})
        assert report_seqs == list(range(report_seqs[0], report_seqs[-1] + 1)), report_seqs
        # every record made during the cut arrives, none missing: seq has no gap up to one made after it
        await until(lambda: any(r["time"] > restored_at for r in records(watcher)),
                    "no telemetry record made after the uplink came back", 60)
        got = sorted({r["seq"] for r in records(watcher)})
        assert got == list(range(got[0], got[-1] + 1)), f"gaps in telemetry seq: {got}"
        during = [r["seq"] for r in records(watcher) if cut_at < r["time"] < restored_at]
        assert len(set(during)) >= CUT_S / 2 and min(during) > before_cut, (before_cut, during)


def rollout_state(env: Path, rollout_id: str) -> str:
    done = subprocess.run([sys.executable, "-m", "agent", "hub", "rollout", "status", rollout_id, "--hub",
                           str(env / "hub"), "--json"], check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    return json.loads(done.stdout)["state"] if done.returncode == 0 else f"status failed: {done.stderr}"


def records(watcher: Watcher) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in watcher.on(TELEMETRY_TOPIC)]
