"""`edgefleet hub status`: per device, desired vs active per model, and the flags an operator
acts on (offline for how long, behind, failing, refused, unreachable, disabled, unexpected).
Desired comes from the hub's signed states when the hub directory is given (rollout
membership included), else from what each device reports it was told."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import EMBED
from mqtt_broker import MosquittoBroker, Watcher
from update_env import GROUP, create_hub, embedding_state, make_release

from security.desired import bucket
from sync.hub.fleet import FleetView
from sync.hub.publish import BundleSource, current_desired, publish_rollout_step, rollout_target
from sync.hub.repository import HubRepository
from sync.hub.status import device_rows, hub_desired

REPO = Path(__file__).resolve().parent.parent
PREFIX = "edgefleet/v1"
V1 = "int8-1.0.0"
NOW = 1_800_000_000.0


def reported(device: str, active: str | None, desired: str | None = V1, *, health: str = "ok",
             code: str | None = None, message: str | None = None, since: float = NOW - 50,
             last: dict[str, Any] | None = None, job: str | None = None, origin: str = "group") -> dict[str, Any]:
    return {
        "schema": "edgefleet.reported/1", "device_id": device, "group": GROUP, "seq": 1, "at": NOW,
        "updates": {"health": health, "code": code, "message": message, "since": since, "last_check": NOW,
                    "last_success": NOW - 10, "check_interval_s": 3600, "accepted_serial": "1.0"},
        "models": {EMBED: {"desired": {"version": desired, "origin": origin, "rollout": None, "serial": 1}
                           if desired else None, "active": active, "state": "ready", "job": job}},
        "jobs_last": {EMBED: last} if last else {}, "last_job": last, "denied": [],
    }


def state(device: str, online: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"schema": "edgefleet.state/1", "device_id": device, "group": GROUP, "online": online}
    if not online:
        body["reason"] = "connection lost"
    return body


def fleet_of(messages: dict[str, dict[str, Any]]) -> FleetView:
    fleet = FleetView(PREFIX)
    for topic, body in messages.items():
        assert fleet.ingest(f"{PREFIX}/devices/{topic}", json.dumps(body).encode(), NOW)
    return fleet


FLEET = {
    "ok/reported": reported("ok", V1),
    "ok/state": state("ok", True),
    "gone/reported": reported("gone", V1),
    "gone/state": state("gone", False),
    "behind/reported": reported("behind", "0.9", desired=V1, job="downloading"),
    "failing/reported": reported("failing", "0.9", last={"job": "j", "model": EMBED, "version": V1,
                                                         "state": "rolled-back", "code": "health-check"}),
    "refused/reported": reported("refused", V1, health="refused", code="signature", message="bad signature"),
    "unreach/reported": reported("unreach", V1, health="hub-unreachable", message="connection refused",
                                 since=NOW - 3600),
    "off/reported": reported("off", V1, desired=None, health="disabled"),
    "rogue/reported": reported("rogue", "9.9"),
}


def test_every_flag_from_what_the_devices_report() -> None:
    rows = {r["device"]: r for r in device_rows(fleet_of(FLEET), NOW, presence={"gone": {"online": False,
                                                                                         "since": NOW - 300}})}
    assert rows["ok"]["flags"] == {} and rows["ok"]["models"] == {EMBED: V1}
    assert rows["ok"]["desired"] == {EMBED: {"version": V1, "origin": "group", "rollout": None}}
    assert rows["gone"]["flags"]["offline"]["for_s"] == 300.0
    assert rows["gone"]["flags"]["offline"]["reason"] == "connection lost"
    assert rows["behind"]["flags"] == {"behind": [EMBED]}
    assert rows["failing"]["flags"] == {"failing": [{"model": EMBED, "version": V1, "state": "rolled-back",
                                                     "code": "health-check"}]}
    assert rows["refused"]["flags"] == {"refused": {"code": "signature", "message": "bad signature"}}
    assert rows["unreach"]["flags"] == {"unreachable": {"since": NOW - 3600, "message": "connection refused"}}
    assert rows["off"]["flags"] == {"disabled": True}
    assert rows["rogue"]["flags"]["unexpected"] == [{"model": EMBED, "active": "9.9"}]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> HubRepository:
    root = embedding_state(tmp_path_factory.mktemp("hub-status"))
    repo = create_hub(root / "hub", root / "state", (EMBED,))
    bundle = make_release(root / "state/models" / EMBED / "current", root / "release-2", "2", onnx_note="2")
    publish_rollout_step(repo, GROUP, rollout_target(repo, BundleSource(bundle, EMBED)), "r-5a1700", 50.0,
                         "5a17005a17005a17")
    return repo


def test_desired_comes_from_the_hubs_signed_states_with_rollout_membership(hub: HubRepository) -> None:
    ids = [f"d{i}" for i in range(12)]
    inside = [d for d in ids if bucket("5a17005a17005a17", d) < 50]
    outside = [d for d in ids if d not in inside]
    assert inside and outside
    # every device says it was told V1 (it has not looked yet): the hub knows better
    fleet = fleet_of({f"{d}/reported": reported(d, V1) for d in ids})
    lookup = hub_desired({GROUP: current_desired(hub, "group", GROUP)}, {})
    rows = {r["device"]: r for r in device_rows(fleet, NOW, lookup)}
    for d in inside:
        assert rows[d]["desired"][EMBED] == {"version": "2", "origin": "rollout", "rollout": "r-5a1700"}
        assert rows[d]["flags"] == {"behind": [EMBED]} and rows[d]["desired_from"] == "hub"
    for d in outside:
        assert rows[d]["desired"][EMBED]["version"] == V1 and rows[d]["flags"] == {}
    # a device outside the share that serves 2 anyway, without being told: flagged
    rogue = outside[0]
    fleet = fleet_of({f"{rogue}/reported": reported(rogue, "2")})
    (row,) = device_rows(fleet, NOW, lookup)
    assert row["flags"]["unexpected"] == [{"model": EMBED, "active": "2"}]


def test_hub_status_cli_shows_desired_vs_active_and_flags(hub: HubRepository, mqtt_broker: MosquittoBroker) -> None:
    with Watcher(mqtt_broker) as device:
        for topic, body in FLEET.items():
            device.publish(f"{PREFIX}/devices/{topic}", json.dumps(body), retain=True)
        device.publish(f"{PREFIX}/devices/junk/reported", b"\x00not json", retain=True)  # ignored, no crash
        args = [sys.executable, "-m", "agent", "hub", "status", "--mqtt", f"{mqtt_broker.host}:{mqtt_broker.port}",
                "--wait", "1.5"]
        done = subprocess.run([*args, "--json"], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        rows = {r["device"]: r for r in json.loads(done.stdout)}
        assert set(rows) == {t.split("/")[0] for t in FLEET}
        assert rows["unreach"]["flags"]["unreachable"]["since"] == NOW - 3600
        assert rows["gone"]["online"] is False and "offline" in rows["gone"]["flags"]
        assert rows["rogue"]["desired_from"] == "device"
        text = subprocess.run([*args, "--hub", str(hub.dir)], cwd=REPO, capture_output=True, text=True,
                              timeout=60, check=False)
        assert text.returncode == 0, text.stderr
        lines = {line.split()[0]: line for line in text.stdout.splitlines()[1:]}
        assert lines["ok"].endswith(" ok") or "behind" in lines["ok"], lines["ok"]  # the hub may move it (rollout)
        assert "offline" in lines["gone"] and "failing all-minilm-l6-v2 (health-check)" in lines["failing"]
        assert "refused (signature)" in lines["refused"] and "unreachable since" in lines["unreach"]
        assert "disabled" in lines["off"] and "unexpected" in lines["rogue"]
