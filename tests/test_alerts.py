"""Alerts on the device: the rules (a threshold held for a duration, a lower resolve level held
for a clear duration, so a value at the threshold does not flap), the ``[alerts]`` config, and a
real agent over a real mosquitto where the disk rule and the failed-model rule fire and resolve:
``firing`` retained on the alert topic, ``resolved`` then the retained copy cleared, the
``edgefleet_alert_firing`` gauge in /metrics, and a fire-and-resolve during a broker outage that
arrives, in order, from the outbox once the broker is back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import EMBED, demo_config, start_agent
from mqtt_broker import MosquittoBroker, Received, Watcher

from agent.app import reconcile_models
from agent.config import AgentConfig, ConfigError, ModelEntry, TelemetryConfig, load_config
from agent.context import LIVE, MODELS
from sync.alerts import AlertBook, AlertSettings, CounterWindow, RuleSettings, alert_payload, quantile
from sync.alerts.settings import DiskRule, ModelFailedRule
from sync.mqtt import MqttSettings
from sync.telemetry import Outbox

# ---- the rules, without an agent ----------------------------------------------------------

RULE = RuleSettings(threshold=80.0, resolve=70.0, for_s=30.0, clear_for_s=60.0)


def feed(values: Sequence[tuple[float, float | None]], rule: RuleSettings = RULE) -> list[tuple[float, str]]:
    """(time, value) pairs through one rule; returns (time, "firing" | "resolved") transitions."""
    book = AlertBook(["temperature"])
    out = []
    for t, value in values:
        for transition in book.evaluate({"temperature": rule}, {"temperature": value}, t, 1_000_000 + t):
            out.append((t, transition.state))
    return out


def test_a_value_above_the_threshold_fires_only_after_it_stayed_there_for_the_duration() -> None:
    assert feed([(0, 81), (10, 90), (20, 85)]) == []  # pending for 20 s of 30
    assert feed([(0, 81), (10, 90), (20, 79), (40, 85)]) == []  # a dip restarts the wait
    assert feed([(0, 81), (10, 90), (30, 85), (40, 85)]) == [(30, "firing")]


def test_a_value_hovering_at_the_threshold_fires_once_and_does_not_flap() -> None:
    hovering = [(t, 80.5 if t % 20 else 79.5) for t in range(0, 600, 5)]  # crosses 80 every few seconds
    # never 30 s above in a row: never fires
    assert feed(hovering) == []
    steady = [(t, 81.0) for t in range(0, 40, 5)] + [(t, 80.5 if t % 20 else 79.5) for t in range(40, 600, 5)]
    assert feed(steady) == [(30, "firing")]  # fires once; 79.5 is above the resolve level: no resolve


def test_it_resolves_only_after_staying_at_or_below_the_resolve_level_for_the_clear_duration() -> None:
    above = [(t, 90.0) for t in range(0, 35, 5)]
    assert feed([*above, (40, 70.0), (60, 65.0), (90, 71.0), (100, 60.0), (150, 60.0), (160, 60.0)]) == [
        (30, "firing"), (160, "resolved")]  # 71 at 90 s restarted the clear wait


def test_a_missing_value_counts_as_clear_and_a_disabled_rule_resolves_at_once() -> None:
    above = [(t, 90.0) for t in range(0, 35, 5)]
    assert feed([*above, (40, None), (100, None)]) == [(30, "firing"), (100, "resolved")]
    book = AlertBook(["temperature"])
    book.evaluate({"temperature": replace(RULE, for_s=0)}, {"temperature": 99.0}, 0, 0)
    (resolved,) = book.evaluate({"temperature": replace(RULE, enabled=False)}, {"temperature": 99.0}, 1, 1)
    assert resolved.state == "resolved" and not book.firing()


def test_the_message_is_a_fixed_sentence_with_the_numbers_and_the_payload_has_the_documented_fields() -> None:
    book = AlertBook(["disk"])
    (t,) = book.evaluate({"disk": DiskRule(for_s=0)}, {"disk": 93.25}, 0, 1700000000.0)
    payload = alert_payload(t, "dev-1", "lab")
    assert payload == {
        "schema": "edgefleet.alert/1", "rule": "disk", "state": "firing", "severity": "warning", "value": 93.25,
        "threshold": 90.0, "resolve": 85.0, "unit": "%", "since": 1700000000.0, "at": 1700000000.0,
        "message": "The state directory's filesystem is 93.25% full, above the limit of 90% full.",
        "device": "dev-1", "group": "lab"}


def test_windows_and_quantiles_over_cumulative_counters() -> None:
    window = CounterWindow()
    for t, v in [(0, 0), (10, 5), (20, 9), (30, 12)]:
        window.add(t, v)
    assert window.increase(30, 15) == 7  # from the sample at 10 s (the baseline at the window's start)
    window.add(40, 1)  # went down: the agent restarted, history starts again
    assert window.increase(40, 300) == 0
    # 100 observations: 50 below 0.1 s, 40 in (0.1, 0.25], 10 in (0.25, 0.5]
    assert quantile(0.95, [0.1, 0.25, 0.5], [50, 90, 100, 100]) == pytest.approx(0.375)
    assert quantile(0.95, [0.1, 0.25], [0, 0, 0]) is None


def test_the_alerts_section_loads_with_the_defaults_kept_and_a_bad_one_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[alerts.temperature]\nthreshold = 95\nresolve = 90\n")
    config = load_config(path, environ={})
    assert config.alerts.temperature.threshold == 95 and config.alerts.temperature.for_s == 60
    assert config.alerts.disk == AlertSettings().disk
    path.write_text("[alerts.disk]\nthreshold = 80\n")  # below the default resolve level (85)
    with pytest.raises(ConfigError, match=r"alerts\.disk: resolve must be at most threshold \(80\), got 85"):
        load_config(path, environ={})
    path.write_text("[alerts.disk]\nfor = 60\n")
    with pytest.raises(ConfigError, match=r"unknown key alerts\.disk\.for \(known: clear_for_s"):
        load_config(path, environ={})


def test_the_documented_alerts_block_shows_the_defaults(tmp_path: Path) -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    block = page.split("```toml\n[alerts]\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "agent.toml"
    path.write_text("[alerts]\n" + block)
    assert load_config(path, environ={}).alerts == AlertSettings()


def test_outbox_messages_keep_their_order_topic_and_retain_flag_across_a_reopen_and_are_bounded(
        tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, max_records=10, max_messages=3)
    outbox.append(outbox.next_seq(), b"record")
    for i in range(4):
        outbox.append_message(f"t/{i}", f"m{i}".encode(), retain=i % 2 == 0)
    outbox.close()
    again = Outbox(tmp_path, max_records=10, max_messages=3)
    got = again.peek_messages(10)
    assert [(m.topic, m.payload, m.retain) for m in got] == [("t/1", b"m1", False), ("t/2", b"m2", True),
                                                            ("t/3", b"m3", False)]
    stats = again.stats()
    assert (stats.messages_queued, stats.messages_dropped, stats.queued, stats.last_seq) == (3, 1, 1, 1)
    again.remove_messages_through(got[1].id)
    assert [m.payload for m in again.peek_messages(10)] == [b"m3"]


# ---- a real agent, a real mosquitto ----------------------------------------------------------

def disk_used_percent(path: Path) -> float:
    usage = psutil.disk_usage(str(path))
    return 100.0 * usage.used / (usage.used + usage.free)


def alert_config(state: Path, broker: MosquittoBroker, device: str, models: list[ModelEntry],
                 alerts: AlertSettings, **mqtt: Any) -> AgentConfig:
    config = demo_config(state, models=())
    link = {"reconnect_min_s": 0.2, "reconnect_max_s": 1.0, "keepalive_s": 5, **mqtt}
    return replace(config, models=models,
                   mqtt=MqttSettings(host=broker.host, port=broker.port, device_id=device, group="lab", **link),
                   telemetry=TelemetryConfig(interval_s=0.3, energy_sample_s=0.1),
                   alerts=replace(alerts, interval_s=0.2))


def own_state(tmp_path: Path, state_dir: Path) -> Path:
    work = tmp_path / "state"
    work.mkdir()
    (work / "models").symlink_to(state_dir / "models")
    return work


def payloads(watcher: Watcher, topic: str) -> list[dict[str, Any] | None]:
    """What arrived on `topic`, in order: each message's JSON, None for an empty (clearing) one."""
    return [json.loads(m.payload) if m.payload else None for m in watcher.on(topic)]


async def gauge_reads(agent: Any, value: float, *, timeout_s: float = 30.0, **labels: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while await agent.metric("edgefleet_alert_firing", **labels) != value:
        assert asyncio.get_running_loop().time() < deadline, f"edgefleet_alert_firing{labels} never read {value}"
        await asyncio.sleep(0.1)


def retained(broker: MosquittoBroker, topic: str) -> list[Received]:
    """What a subscriber that comes now is given from the broker's retained store."""
    with Watcher(broker, topic) as late:
        with contextlib.suppress(AssertionError):
            late.wait_for(topic, 1, timeout_s=1.5)
        return [m for m in late.on(topic) if m.retain]


def set_disk_rule(agent: Any, threshold: float) -> None:
    """What a SIGHUP with a new ``[alerts.disk]`` does: the alerts read the live config."""
    live = agent.app[LIVE]
    rule = DiskRule(threshold=threshold, resolve=threshold, for_s=0, clear_for_s=0)
    live.config = replace(live.config, alerts=replace(live.config.alerts, disk=rule))


async def test_the_disk_rule_fires_retained_shows_in_metrics_and_resolves_clearing_the_retained_copy(
        tmp_path: Path, state_dir: Path, mqtt_broker: MosquittoBroker) -> None:
    state = own_state(tmp_path, state_dir)
    threshold = max(0.0, round(disk_used_percent(state) - 10, 1))  # the real filesystem is above it
    alerts = replace(AlertSettings(), disk=DiskRule(threshold=threshold, resolve=threshold, for_s=0, clear_for_s=0))
    config = alert_config(state, mqtt_broker, "alert-disk", [ModelEntry(name=EMBED)], alerts)
    topic = "edgefleet/v1/devices/alert-disk/alerts/disk"
    with Watcher(mqtt_broker, "edgefleet/v1/devices/alert-disk/alerts/#") as watcher:
        async with start_agent(config) as agent:
            await watcher.wait(topic, 1)
            firing = payloads(watcher, topic)[0]
            assert firing is not None
            assert firing["schema"] == "edgefleet.alert/1" and firing["state"] == "firing"
            assert firing["device"] == "alert-disk" and firing["group"] == "lab"
            assert firing["value"] > firing["threshold"] == threshold
            assert firing["message"].startswith("The state directory's filesystem is ")
            kept = retained(mqtt_broker, topic)
            assert len(kept) == 1 and json.loads(kept[0].payload)["state"] == "firing"
            assert await agent.metric("edgefleet_alert_firing", rule="disk", severity="warning") == 1
            _, text = await agent.get("/metrics")
            assert 'edgefleet_alert_firing{rule="temperature",severity="warning"} 0.0' in text
            assert watcher.on("edgefleet/v1/devices/alert-disk/alerts/temperature") == []  # nothing else fired

            set_disk_rule(agent, 100.0)  # the operator raises the limit: the disk is now below it
            await watcher.wait(topic, 3)
            resolved, cleared = payloads(watcher, topic)[1:3]
            assert resolved is not None and resolved["state"] == "resolved"
            assert resolved["since"] == firing["since"] and resolved["at"] >= firing["at"]
            assert resolved["message"].endswith(": resolved.")
            assert cleared is None  # the empty retained message that clears the firing one
            assert [m.retain for m in watcher.on(topic)] == [False, False, False]  # live delivery
            assert retained(mqtt_broker, topic) == []  # a fleet page that comes now sees nothing firing
            assert await agent.metric("edgefleet_alert_firing", rule="disk", severity="warning") == 0
    assert (state / "alerts.json").is_file()


async def test_a_model_that_fails_fires_a_critical_alert_that_resolves_once_it_serves(
        tmp_path: Path, state_dir: Path, mqtt_broker: MosquittoBroker) -> None:
    state = own_state(tmp_path, state_dir)
    spare = tmp_path / "spare-bundle"  # not there yet: the model fails to load
    config = alert_config(state, mqtt_broker, "alert-model", [ModelEntry(name=EMBED),
                                                               ModelEntry(name="spare", path=str(spare))],
                          AlertSettings())
    topic = "edgefleet/v1/devices/alert-model/alerts/model_failed"
    with Watcher(mqtt_broker, topic) as watcher:
        async with start_agent(config) as agent:
            await watcher.wait(topic, 1)
            firing = payloads(watcher, topic)[0]
            assert firing is not None and firing["state"] == "firing" and firing["severity"] == "critical"
            assert firing["value"] == 1
            assert firing["message"] == "Models failed (load or probe): 1, above the limit of 0."
            assert await agent.metric("edgefleet_alert_firing", rule="model_failed", severity="critical") == 1

            shutil.copytree((state_dir / "models" / EMBED / "current").resolve(), spare)
            await reconcile_models(config, agent.app[MODELS])  # what a reload (SIGHUP) does
            await watcher.wait(topic, 3)
            resolved, cleared = payloads(watcher, topic)[1:3]
            assert resolved is not None and resolved["state"] == "resolved" and resolved["value"] == 0
            assert cleared is None
            assert await agent.metric("edgefleet_alert_firing", rule="model_failed", severity="critical") == 0


async def test_an_alert_that_fires_and_resolves_during_a_broker_outage_arrives_in_order_from_the_outbox(
        tmp_path: Path, state_dir: Path) -> None:
    passwords = tmp_path / "passwd"

    def set_password(agent_password: str) -> None:
        subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "agent", agent_password], check=True)
        subprocess.run(["mosquitto_passwd", "-b", str(passwords), "watcher", "watch"], check=True)

    set_password("right")
    broker = MosquittoBroker(tmp_path)
    broker.extra_config = f"listener {broker.port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\n"
    broker.start()
    state = own_state(tmp_path, state_dir)
    alerts = replace(AlertSettings(), disk=DiskRule(threshold=100, resolve=100, for_s=0, clear_for_s=0),
                     model_failed=ModelFailedRule(enabled=False))
    config = alert_config(state, broker, "alert-outage", [ModelEntry(name=EMBED)], alerts, username="agent",
                          password="right")
    topic = "edgefleet/v1/devices/alert-outage/alerts/disk"
    try:
        async with start_agent(config) as agent:
            with Watcher(broker, "edgefleet/v1/devices/alert-outage/state", username="watcher",
                         password="watch") as before:
                await before.wait("edgefleet/v1/devices/alert-outage/state", 1)  # the agent is connected
            broker.stop()  # the outage begins
            set_password("not yet")  # so that after it the watcher subscribes before the agent returns
            set_disk_rule(agent, max(0.0, round(disk_used_percent(state) - 10, 1)))
            await gauge_reads(agent, 1, rule="disk", severity="warning")  # it fires while the broker is away
            set_disk_rule(agent, 100.0)
            await gauge_reads(agent, 0, rule="disk", severity="warning")  # and resolves, the broker still away
            await asyncio.to_thread(broker.start)
            with Watcher(broker, topic, username="watcher", password="watch") as after:
                set_password("right")
                broker.reload()  # now the agent's next retry gets in
                await after.wait(topic, 3, timeout_s=30)
                firing, resolved, cleared = payloads(after, topic)[:3]
    finally:
        broker.stop()
    assert firing is not None and firing["state"] == "firing"
    assert resolved is not None and resolved["state"] == "resolved" and resolved["since"] == firing["since"]
    assert cleared is None
    assert firing["at"] < resolved["at"]


async def test_an_alert_firing_when_the_agent_stops_is_resolved_and_cleared_after_a_restart(
        tmp_path: Path, state_dir: Path, mqtt_broker: MosquittoBroker) -> None:
    state = own_state(tmp_path, state_dir)
    low = max(0.0, round(disk_used_percent(state) - 10, 1))
    rule = DiskRule(threshold=low, resolve=low, for_s=0, clear_for_s=0)
    config = alert_config(state, mqtt_broker, "alert-restart", [ModelEntry(name=EMBED)],
                          replace(AlertSettings(), disk=rule))
    topic = "edgefleet/v1/devices/alert-restart/alerts/disk"
    with Watcher(mqtt_broker, topic) as watcher:
        async with start_agent(config):
            await watcher.wait(topic, 1)
        assert len(retained(mqtt_broker, topic)) == 1  # still firing while the agent is away
        raised = replace(config, alerts=replace(config.alerts, disk=replace(rule, threshold=100.0, resolve=100.0)))
        async with start_agent(raised):  # the limit was raised while it was down
            await watcher.wait(topic, 3)
        firing, resolved, cleared = payloads(watcher, topic)[:3]
    assert firing is not None and resolved is not None and resolved["state"] == "resolved"
    assert resolved["since"] == firing["since"]
    assert cleared is None and retained(mqtt_broker, topic) == []
