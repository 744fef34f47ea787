"""Telemetry over a real mosquitto: records at the configured interval with the documented
fields, joules per token growing with tokens, the same figures in /metrics, the Last Will
when the agent is SIGKILLed, and nothing lost through a broker outage with an agent restart."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import CHAT, EMBED, demo_config, start_agent
from mqtt_broker import MosquittoBroker, Watcher, free_port

from agent.config import AgentConfig, TelemetryConfig
from agent.context import MQTT
from sync.mqtt import MqttSettings

REPO = Path(__file__).resolve().parent.parent
#: The issue asks for a minute; set OUTAGE_TEST_S lower for a quick run.
OUTAGE_S = float(os.environ.get("OUTAGE_TEST_S", "60"))


def telemetry_config(state_dir: Path, broker: MosquittoBroker, device: str, models: tuple[str, ...],
                     interval_s: float = 0.5, **mqtt: Any) -> AgentConfig:
    config = demo_config(state_dir, models=models)
    link = {"reconnect_min_s": 0.2, "reconnect_max_s": 1.0, "keepalive_s": 5, **mqtt}
    return replace(
        config,
        mqtt=MqttSettings(host=broker.host, port=broker.port, device_id=device, group="lab", **link),
        telemetry=TelemetryConfig(interval_s=interval_s, energy_sample_s=0.25),
    )


def own_state(tmp_path: Path, state_dir: Path) -> Path:
    """A state dir of the test's own (its own outbox) that shares the demo bundles."""
    work = tmp_path / "state"
    work.mkdir()
    (work / "models").symlink_to(state_dir / "models")
    return work


def records(watcher: Watcher, topic: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in watcher.on(topic)]


async def record_where(watcher: Watcher, topic: str, predicate, timeout_s: float = 30.0) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        for record in reversed(records(watcher, topic)):
            if predicate(record):
                return record
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no record matched; last: {records(watcher, topic)[-1:]}")
        await asyncio.sleep(0.1)


async def chat(agent, max_tokens: int, text: str) -> int:  # type: ignore[no-untyped-def]
    status, body, _ = await agent.post("/v1/chat/completions", json={
        "model": CHAT, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
        "temperature": 0})
    assert status == 200, body
    return int(body["usage"]["completion_tokens"])


async def test_records_arrive_at_the_interval_with_the_documented_fields_and_joules_per_token_grow(
        mqtt_broker, state_dir, tmp_path):
    config = telemetry_config(own_state(tmp_path, state_dir), mqtt_broker, "tele-1", (CHAT,))
    topic = "edgefleet/v1/devices/tele-1/telemetry"
    with Watcher(mqtt_broker, topic) as watcher:
        async with start_agent(config) as agent:
            await record_where(watcher, topic, lambda r: r["models"].get(CHAT, {}).get("state") == "ready")
            first = await watcher.wait(topic, len(watcher.on(topic)) + 3)
            seqs = [json.loads(m.payload)["seq"] for m in first]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            gaps = [b.at - a.at for a, b in itertools.pairwise(first)]
            assert 0.2 < statistics.median(gaps) < 2.0  # the configured 0.5 s, loosely (a busy 2-core CI)

            record = json.loads(first[-1].payload)
            assert record["schema"] == "edgefleet.telemetry/1" and record["device_id"] == "tele-1"
            assert record["interval_s"] == 0.5 and len(record["boot_id"]) >= 32 and record["run_id"]
            system = record["system"]
            assert 0.0 <= system["system.cpu.utilization"] <= 1.0
            assert len(system["system.cpu.utilization.per_cpu"]) == system["system.cpu.logical.count"] >= 1
            assert 0 < system["system.memory.usage"]["used"] < system["system.memory.limit"]
            assert system["process.memory.usage"] > 50 * 2**20  # the agent with a model loaded
            assert system["system.filesystem.usage"]["free"] > 0 and system["process.uptime"] > 0
            energy = record["energy"]
            assert energy["method"] in ("measured", "estimated", "mixed")
            assert energy["hw.host.energy"] >= 0 and energy["hw.host.power"] > 0
            assert energy["covers"]["domains"] and all(s["reason"] for s in energy["sources"] if not s["available"])
            att = energy["attribution"]
            assert att["total_j"] == pytest.approx(att["active_j"] + att["idle_j"], abs=0.01)
            model = record["models"][CHAT]
            assert model["state"] == "ready" and model["version"] and model["generated_tokens"] == 0
            assert model["joules_per_token"] is None  # no tokens yet: no figure, not 0

            tokens = await chat(agent, 8, "Say hello.") + await chat(agent, 8, "Name a colour.")
            after_few = await record_where(
                watcher, topic, lambda r: r["models"][CHAT]["generated_tokens"] >= tokens
                and r["models"][CHAT]["energy_j"] > 0 and r["models"][CHAT]["queue_depth"] == 0)
            more = await chat(agent, 64, "Write a long story about a lighthouse.")
            more += await chat(agent, 64, "Describe the sea in many words.")
            after_more = await record_where(
                watcher, topic, lambda r: r["models"][CHAT]["generated_tokens"] >= tokens + more
                and r["seq"] > after_few["seq"] + 1)
            few_m, more_m = after_few["models"][CHAT], after_more["models"][CHAT]
            assert few_m["joules_per_token"] > 0 and few_m["joules_per_request"] > 0
            assert more_m["energy_j"] > few_m["energy_j"]  # more tokens, more joules
            assert more_m["energy_incl_idle_j"] >= more_m["energy_j"]
            assert more_m["requests"]["generate"] == 4 and more_m["completed"] == 4 and more_m["failed"] == 0
            assert more_m["time_to_first_token_s"]["count"] == 4 and more_m["busy_s"] > 0

            # /metrics: the same runtime figures, Prometheus names
            assert await agent.metric("edgefleet_generated_tokens_total", model=CHAT) == more_m["generated_tokens"]
            assert await agent.metric("edgefleet_model_energy_joules_total", model=CHAT, part="active") > 0
            assert await agent.metric("edgefleet_energy_joules_total") > 0
            assert await agent.metric("gen_ai_server_time_to_first_token_seconds_count", model=CHAT) == 4
            assert await agent.metric("edgefleet_telemetry_outbox_dropped_total") == 0
            assert await agent.metric("edgefleet_mqtt_connected") == 1
            assert await agent.metric("process_resident_memory_bytes") > 0
            before_stop = records(watcher, topic)[-1]["seq"]
        # a clean stop (SIGTERM) stores a last record of the run and hands it over before going offline
        last = await record_where(watcher, topic, lambda r: r.get("final") is True, timeout_s=10)
        assert last["seq"] > before_stop and last == records(watcher, topic)[-1]
        assert last["models"][CHAT]["generated_tokens"] == more_m["generated_tokens"]


def test_a_sigkilled_agent_goes_offline_through_its_last_will(mqtt_broker, state_dir, tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(f"""
state_dir = "{own_state(tmp_path, state_dir)}"
[server]
port = {free_port()}
[mqtt]
host = "127.0.0.1"
port = {mqtt_broker.port}
device_id = "victim"
[telemetry]
interval_s = 0.5
energy_sample_s = 0.25
""")
    state = "edgefleet/v1/devices/victim/state"
    telemetry = "edgefleet/v1/devices/victim/telemetry"
    with Watcher(mqtt_broker, state, telemetry) as watcher:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "serve", "--config", str(config)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "agent.log", "wb"))  # noqa: SIM115
        try:
            try:
                watcher.wait_for(telemetry, 2, timeout_s=30)
            except AssertionError:
                raise AssertionError((tmp_path / "agent.log").read_text()[-3000:]) from None
            seen = len(watcher.on(state))
            assert json.loads(watcher.on(state)[-1].payload)["online"] is True
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            offline = json.loads(watcher.wait_for(state, seen + 1)[-1].payload)
        finally:
            proc.kill()
            proc.wait()
    assert offline["online"] is False and offline["reason"] == "connection lost"


async def test_a_broker_outage_with_an_agent_restart_loses_no_record(tmp_path, state_dir):
    """Broker down for OUTAGE_S while the agent serves, the agent restarted once in between,
    broker back: every record arrives, in order; a repeat has a seq already seen."""
    passwords = tmp_path / "passwd"

    def set_password(agent_password: str) -> None:
        subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "agent", agent_password], check=True)
        subprocess.run(["mosquitto_passwd", "-b", str(passwords), "watcher", "watch"], check=True)

    set_password("right")
    broker = MosquittoBroker(tmp_path)
    broker.extra_config = f"listener {broker.port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\n"
    broker.start()
    config = telemetry_config(own_state(tmp_path, state_dir), broker, "outage-1", (EMBED,), username="agent",
                              password="right", reconnect_min_s=1.0, reconnect_max_s=1.0)
    topic = "edgefleet/v1/devices/outage-1/telemetry"
    served = 0

    async def serve_for(agent, seconds: float) -> None:  # type: ignore[no-untyped-def]
        nonlocal served
        end = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < end:
            status, _, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": "still serving"})
            assert status == 200
            served += 1
            await asyncio.sleep(0.2)

    try:
        with Watcher(broker, topic, username="watcher", password="watch") as before:
            async with AsyncExitStack() as stack:
                agent = await stack.enter_async_context(start_agent(config))
                await before.wait(topic, 3)
                broker.stop()  # the outage begins
                set_password("not yet")  # so that after it the watcher subscribes before the agent returns
                await serve_for(agent, OUTAGE_S / 2)
            first_run_seen = records(before, topic)
        async with start_agent(config) as agent:  # the restart, still during the outage
            await serve_for(agent, OUTAGE_S / 2)
            await asyncio.to_thread(broker.start)
            with Watcher(broker, topic, username="watcher", password="watch") as after:
                set_password("right")
                broker.reload()  # now the agent's next retry gets in
                live_seq = None
                give_up = asyncio.get_running_loop().time() + 120
                while live_seq is None or not any(r["seq"] > live_seq + 2 for r in records(after, topic)):
                    await asyncio.sleep(0.2)
                    got = records(after, topic)
                    if live_seq is None and got and got[-1]["telemetry"]["outbox_queued"] <= 1:
                        live_seq = got[-1]["seq"]  # caught up: this record was sent as it was made
                    assert asyncio.get_running_loop().time() < give_up, (agent.app[MQTT].status, len(got))
                after_seen = records(after, topic)
            assert await agent.metric("edgefleet_telemetry_outbox_dropped_total") == 0
    finally:
        broker.stop()

    assert served > 0
    run_ids = {r["run_id"] for r in first_run_seen + after_seen}
    assert len(run_ids) == 2  # records of both agent runs
    seqs_after = [r["seq"] for r in after_seen]
    firsts = list(dict.fromkeys(seqs_after))
    assert firsts == sorted(firsts)  # in order
    by_seq: dict[int, dict[str, Any]] = {}
    for r in first_run_seen + after_seen:
        if r["seq"] in by_seq:  # a QoS 1 repeat: same seq, same record
            assert r == by_seq[r["seq"]]
        by_seq[r["seq"]] = r
    everything = sorted(by_seq)
    assert everything == list(range(everything[0], everything[-1] + 1)), "a record is missing"
    outage_records = [s for s in everything if s > max(r["seq"] for r in first_run_seen)]
    assert len(outage_records) >= OUTAGE_S / 0.5 * 0.5  # about one per interval while the broker was away
    assert all(r["telemetry"]["outbox_dropped"] == 0 for r in after_seen)


async def test_an_agent_stopping_while_a_record_is_being_made_leaves_no_gap_in_seq(tmp_path):
    """A record takes its seq before it is stored: stopping the agent in between (the outbox
    busy, here held by a slow job on its disk thread) must not leave that number unused, or
    the fleet reads a lost record. The outbox holds 1, 2 and the final 3, in order."""
    import threading

    from sync.mqtt import MqttLink
    from sync.telemetry import Outbox, TelemetryPublisher

    link = MqttLink(MqttSettings(host="127.0.0.1", port=free_port(), device_id="gap-1", group="lab",
                                 reconnect_min_s=0.2, reconnect_max_s=1.0))  # no broker: records wait in the outbox
    outbox = Outbox(tmp_path / "outbox")
    publisher = TelemetryPublisher(link, outbox, lambda seq, *_: {"seq": seq}, interval_s=0.05)
    await publisher.start()
    while outbox.stats().last_seq < 1:  # the first record is stored
        await asyncio.sleep(0.01)
    disk_free = threading.Event()
    publisher._io.submit(disk_free.wait, 10)  # the disk thread stalls: the next record waits on it
    await asyncio.sleep(0.2)  # the ticker has taken seq 2 and waits for the disk
    stopping = asyncio.create_task(publisher.stop(flush_s=0))
    await asyncio.sleep(0.1)  # the ticker is cancelled while its record waits
    disk_free.set()
    await stopping
    reopened = Outbox(tmp_path / "outbox")
    seqs = [seq for seq, _ in reopened.peek(100, 0)]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 3, seqs
    assert json.loads(reopened.peek(100, 0)[-1][1])["seq"] == seqs[-1]
    reopened.close()
