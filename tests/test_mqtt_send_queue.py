"""What waits for a stopped broker is bounded by bytes, not only by count, and what falls
off is counted in /metrics: a serving agent, a real mosquitto stopped under it, and update
reports of 64 KiB each."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import replace

from conftest import demo_config, start_agent
from mqtt_broker import Watcher

from agent.context import MQTT
from sync.mqtt import MqttSettings
from sync.reporter import Reporter

MAX_BYTES = 256 * 1024
PAYLOAD = 64 * 1024
REPORTS = 100


async def test_a_stopped_broker_holds_at_most_the_byte_bound_and_drops_are_counted(mqtt_broker, tmp_path):
    config = replace(demo_config(tmp_path / "state", models=()), mqtt=MqttSettings(
        host=mqtt_broker.host, port=mqtt_broker.port, device_id="bulky", group="lab", reconnect_min_s=0.2,
        reconnect_max_s=0.5, keepalive_s=5, send_queue_max_bytes=MAX_BYTES))
    async with start_agent(config) as agent:
        link = agent.app[MQTT]
        await link.wait_connected(10)
        reporter = Reporter(link.topics.update, lambda topic, payload: link.publish(topic, payload, retain=True),
                            queue=link.send_queue("update report"))
        sender = asyncio.create_task(reporter.run(), name="test-reporter")
        try:
            await asyncio.to_thread(mqtt_broker.stop)
            while link.connected:
                await asyncio.sleep(0.05)
            for n in range(REPORTS):  # 6.4 MB of reports while the broker is away
                reporter.report({"n": n, "pad": "x" * PAYLOAD})
            await asyncio.sleep(0.2)
            queued_bytes = await agent.metric("edgefleet_mqtt_send_queue_bytes")
            queued = await agent.metric("edgefleet_mqtt_send_queue_messages")
            dropped = await agent.metric("edgefleet_mqtt_send_dropped_messages_total")
            dropped_bytes = await agent.metric("edgefleet_mqtt_send_dropped_bytes_total")
            assert 0 < queued_bytes <= MAX_BYTES  # a count bound alone held all 6.4 MB
            assert queued <= MAX_BYTES // PAYLOAD
            assert dropped + queued + 1 == REPORTS  # every report is queued, being sent, or counted
            assert dropped_bytes >= dropped * PAYLOAD

            await asyncio.to_thread(mqtt_broker.start)
            with Watcher(mqtt_broker, link.topics.update) as watcher:
                got = await _wait_for_last(watcher, link.topics.update)
            assert got[-1] == REPORTS - 1  # the newest report was kept and delivered
            assert got == sorted(got) and len(got) <= queued + 1  # in order; the dropped ones never came
            while reporter.pending:
                await asyncio.sleep(0.05)
            assert await agent.metric("edgefleet_mqtt_send_queue_bytes") == 0
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender


async def _wait_for_last(watcher: Watcher, topic: str, timeout_s: float = 30.0) -> list[int]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        numbers = [json.loads(m.payload)["n"] for m in watcher.on(topic)]
        if numbers and numbers[-1] == REPORTS - 1:
            return list(dict.fromkeys(numbers))
        assert loop.time() < deadline, numbers
        await asyncio.sleep(0.1)
