"""Simulated devices for the fleet view: messages of the real schemas (edgefleet.state/1,
reported/1, update/1, telemetry/1, alert/1), published by one paho client as a fleet of
agents would (retained where the agents retain). Used by tests/test_fleet_view.py,
bench/bench_fleet_view.py and docs/screenshots.py."""

from __future__ import annotations

import json
import math
import random
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

PREFIX = "edgefleet/v1"
EMBED = "all-minilm-l6-v2"
CHAT = "smollm2-135m-instruct"


def state(device: str, group: str, online: bool = True, models: dict[str, str] | None = None,
          reason: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"schema": "edgefleet.state/1", "device_id": device, "group": group, "online": online}
    if online:
        body |= {"at": time.time(), "agent_version": "0.1.0", "boot_id": "b", "started_at": time.time() - 60,
                 "models": {n: {"version": v, "state": "ready"} for n, v in (models or {}).items()}}
    else:
        body["reason"] = reason or "connection lost"
    return body


def reported(device: str, group: str, models: dict[str, tuple[str | None, str | None]], health: str = "ok",
             code: str | None = None, message: str | None = None, job: dict[str, Any] | None = None,
             agent_version: str = "0.1.0") -> dict[str, Any]:
    now = time.time()
    return {
        "schema": "edgefleet.reported/1", "device_id": device, "group": group, "agent_version": agent_version,
        "seq": 1, "at": now,
        "updates": {"health": health, "code": code, "message": message, "since": now - 300, "last_check": now,
                    "last_success": now if health == "ok" else now - 3600, "check_interval_s": 1800,
                    "accepted_serial": "3.0", "targets_version": 4},
        "models": {n: {"desired": {"version": want, "origin": "group", "rollout": None, "serial": 3} if want else None,
                       "active": active, "state": "ready", "job": None} for n, (want, active) in models.items()},
        "last_job": job, "jobs_last": {job["model"]: job} if job else {}, "denied": [],
    }


def update(device: str, group: str, model: str, version: str, state_: str, code: str | None = None,
           message: str | None = None, seq: int = 1) -> dict[str, Any]:
    return {"schema": "edgefleet.update/1", "device": device, "group": group, "seq": seq, "job": f"j{seq:04d}",
            "model": model, "version": version, "from_version": "1", "state": state_, "code": code,
            "message": message, "serial": "3.0", "targets_version": 4, "serving": {model: "1"}, "at": time.time()}


def telemetry(device: str, group: str, seq: int, t: float, tokens: int, *, power_w: float = 6.0,
              temp_c: float | None = 52.0, mem_used: float = 1.5e9, cpu: float = 0.3,
              jpt: float | None = 0.42, method: str = "measured") -> dict[str, Any]:
    return {
        "schema": "edgefleet.telemetry/1", "seq": seq, "device_id": device, "group": group, "agent_version": "0.1.0",
        "boot_id": "b", "run_id": f"run-{device}", "start_time": t - 60 * seq, "time": t, "interval_s": 5.0,
        "system": {"system.cpu.utilization": cpu,
                   "system.memory.usage": {"used": mem_used, "available": 4e9 - mem_used},
                   "system.memory.limit": 4e9, "hw.temperature": {"cpu_thermal/temp1": temp_c} if temp_c else {}},
        "energy": {"method": method, "hw.host.power": power_w, "hw.host.energy": power_w * 60 * seq,
                   "covers": {"domains": ["hwmon:VDD_IN"], "sources": ["board input (INA3221 VDD_IN)"]}},
        "models": {CHAT: {"version": "q4", "state": "ready", "prompt_tokens": tokens // 3,
                          "generated_tokens": tokens - tokens // 3, "joules_per_token": jpt},
                   EMBED: {"version": "1", "state": "ready", "prompt_tokens": tokens // 10, "generated_tokens": 0,
                           "joules_per_token": None if jpt is None else round(jpt / 20, 4)}},
        "telemetry": {"outbox_queued": 0, "outbox_dropped": 0},
    }


def alert(device: str, group: str, rule: str, state_: str = "firing", value: float = 81.0,
          threshold: float = 80.0, severity: str = "warning") -> dict[str, Any]:
    return {"schema": "edgefleet.alert/1", "rule": rule, "state": state_, "severity": severity, "value": value,
            "threshold": threshold, "resolve": threshold - 5, "unit": "°C", "since": time.time() - 120,
            "at": time.time(), "message": f"The temperature is {value} °C, above the limit of {threshold} °C.",
            "device": device, "group": group}


class Publisher:
    """One MQTT client publishing for many simulated devices."""

    def __init__(self, host: str, port: int, prefix: str = PREFIX) -> None:
        self.prefix = prefix
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{time.monotonic_ns()}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(1000)
        self.client.connect(host, port)
        self.client.loop_start()

    def send(self, device: str, kind: str, body: dict[str, Any] | bytes, retain: bool | None = None,
             wait: bool = False) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        keep = retain if retain is not None else kind in ("state", "reported", "update") or kind.startswith("alerts/")
        info = self.client.publish(f"{self.prefix}/devices/{device}/{kind}", payload, qos=1, retain=keep)
        if wait:
            info.wait_for_publish(10)

    def raw(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def realistic_fleet(pub: Publisher, n: int, seed: int = 7) -> list[str]:
    """`n` devices in three groups with a mix of states: most fine, some offline, behind,
    refused, unreachable, hot; two telemetry records each so tokens/s is known."""
    rng = random.Random(seed)
    groups = ["shop-floor", "warehouse", "lab"]
    ids = []
    for i in range(n):
        group = groups[i % 3]
        device = f"{group.split('-')[0][:5]}-{i:03d}"
        ids.append(device)
        kind = rng.random()
        online = kind > 0.08
        models = {EMBED: ("2", "2"), CHAT: ("q4_1-0.1.2-2", "q4_1-0.1.2-2")}
        health, code, message, job = "ok", None, None, None
        if 0.08 < kind < 0.16:
            models[EMBED] = ("2", "1")
            job = {"job": "6f3a", "model": EMBED, "version": "2", "state": "rolled-back", "code": "health-check",
                   "message": "probe returned NaN", "at": time.time()}
        elif 0.16 < kind < 0.2:
            health, code, message = "hub-unreachable", "hub-unreachable", "http://hub:8000: connection refused"
        elif 0.2 < kind < 0.23:
            health, code, message = "refused", "signature", "timestamp metadata not signed by a threshold of keys"
        pub.send(device, "state", state(device, group, online, {n_: a for n_, (_, a) in models.items() if a}))
        pub.send(device, "reported", reported(device, group, models, health, code, message, job))
        if job:
            pub.send(device, "update", update(device, group, EMBED, "2", "rolled-back", "health-check",
                                              "probe returned NaN"))
        hot = rng.random() < 0.05
        for k in range(2):
            pub.send(device, "telemetry", telemetry(device, group, k + 1, time.time() - 5 + 5 * k, 400 * k + 100,
                                                   power_w=round(4 + 8 * rng.random(), 2),
                                                   temp_c=round(84 if hot else 45 + 20 * rng.random(), 1),
                                                   mem_used=1e9 + 2e9 * rng.random(), cpu=rng.random(),
                                                   jpt=round(0.2 + 0.5 * rng.random(), 3)))
        if hot:
            pub.send(device, "alerts/temperature", alert(device, group, "temperature", value=84.0))
    pub.client.publish("sync", b"").wait_for_publish(10)
    return ids


def wave(t: float, period: float = 60.0) -> float:
    return 0.5 + 0.5 * math.sin(2 * math.pi * t / period)
