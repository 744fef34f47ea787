"""Staged rollouts: the decision (pure: advance, wait, complete, abort), the messages the
controller must shrug off, a record that outlives the controller, and the whole thing end
to end with real agents, a real mosquitto and a real hub."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import EMBED, free_port
from mqtt_broker import MosquittoBroker, Watcher
from paho.mqtt.enums import MQTTProtocolVersion
from service_process import ServiceProcess, write_config
from update_env import GROUP, create_hub, embedding_state, make_release

from security.desired import bucket
from sync.hub.fleet import MAX_MESSAGE_BYTES, FleetView
from sync.hub.publish import BundleSource, current_desired, rollout_target
from sync.hub.repository import HubRepository
from sync.hub.rollouts import actions
from sync.hub.rollouts.decide import evaluate
from sync.hub.rollouts.record import Plan, RolloutRecord
from sync.hub.rollouts.store import RolloutStore

REPO = Path(__file__).resolve().parent.parent
PREFIX = "edgefleet/v1"
MODEL = EMBED
SALT = "00112233aabbccdd"
T0 = 1_800_000_000.0  # the hub's clock at the step's start
V1 = "int8-1.0.0"


def record(steps: list[float] | None = None, **plan: Any) -> RolloutRecord:
    settings = {"wait_s": 60.0, "max_failure_ratio": 0.1, "min_devices": 5, "report_deadline_s": 600.0} | plan
    return RolloutRecord(id="r-abc123", group="lab", model=MODEL, from_version="1", to_version="2",
                         to_files={}, plan=Plan(steps=steps or [100.0], **settings), salt=SALT, serial=7,
                         step_started_at=T0, created_at=T0)


def state(device: str, version: str, online: bool = True, at: float = T0, group: str = "lab") -> bytes:
    return json.dumps({"schema": "edgefleet.state/1", "device_id": device, "group": group, "online": online,
                       "at": at, "models": {MODEL: {"version": version, "state": "ready"}}}).encode()


def reported(device: str, active: str, desired: str = "2", job: str | None = None, last: dict | None = None,
             at: float = T0, group: str = "lab", accepted: str = "7.0") -> bytes:
    return json.dumps({
        "schema": "edgefleet.reported/1", "device_id": device, "group": group, "seq": 3, "at": at,
        "updates": {"health": "ok", "accepted_serial": accepted, "last_check": at, "last_success": at},
        "models": {MODEL: {"desired": {"version": desired, "origin": "rollout", "rollout": "r-abc123", "serial": 7},
                           "active": active, "state": "ready", "job": job}},
        "jobs_last": {MODEL: last} if last else {}, "last_job": last, "denied": [],
    }).encode()


def update(device: str, state_: str, version: str = "2", code: str | None = None, serial: str = "7.0",
           at: float = T0) -> bytes:
    return json.dumps({"schema": "edgefleet.update/1", "device": device, "group": "lab", "seq": 5, "job": "j1",
                       "model": MODEL, "version": version, "from_version": "1", "state": state_, "code": code,
                       "message": code, "serial": serial, "serving": {MODEL: "1"}, "at": at}).encode()


def fleet_of(*messages: tuple[str, str, bytes], at: float = T0) -> FleetView:
    fleet = FleetView(PREFIX)
    for device, kind, payload in messages:
        fleet.ingest(f"{PREFIX}/devices/{device}/{kind}", payload, at)
    return fleet


def devices(n: int, prefix: str = "d") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


# ---- the decision -------------------------------------------------------------------------------


def test_a_step_waits_its_wait_then_advances_when_every_device_succeeded() -> None:
    rec = record([50.0, 100.0], wait_s=60)
    ids = devices(10)
    fleet = fleet_of(*[(d, "reported", reported(d, "2" if bucket(SALT, d) < 50 else "1")) for d in ids])
    early = evaluate(rec, fleet.devices, T0 + 30)
    assert early.action == "wait" and "waits 30s more" in (early.reason or "")
    late = evaluate(rec, fleet.devices, T0 + 61)
    assert late.action == "advance", late
    in_step = sum(bucket(SALT, d) < 50 for d in ids)
    assert late.counts["succeeded"] == in_step and late.counts["in_step"] == in_step


def test_the_last_step_completes() -> None:
    fleet = fleet_of(*[(d, "state", state(d, "2")) for d in devices(3)])
    decision = evaluate(record([100.0], wait_s=0), fleet.devices, T0)
    assert decision.action == "complete" and decision.counts["succeeded"] == 3


def test_a_step_waits_for_devices_still_working() -> None:
    fleet = fleet_of(("a", "state", state("a", "2")), ("b", "update", update("b", "downloading")),
                     ("c", "state", state("c", "1")), ("d", "state", state("d", "1", online=False)))
    decision = evaluate(record(wait_s=0), fleet.devices, T0 + 120)
    assert decision.action == "wait"
    assert {k: decision.counts[k] for k in ("succeeded", "in-progress", "pending", "offline")} == {
        "succeeded": 1, "in-progress": 1, "pending": 1, "offline": 1}


def test_a_device_serving_the_version_under_its_health_check_has_not_succeeded_yet() -> None:
    """The switch comes before the health check, which may still roll it back."""
    checking = fleet_of(("a", "reported", reported("a", "2", job="health-check")),
                        ("b", "update", update("b", "health-check")), ("b", "state", state("b", "2")))
    decision = evaluate(record(wait_s=0), checking.devices, T0 + 1)
    assert decision.action == "wait" and decision.counts["in-progress"] == 2 and decision.counts["succeeded"] == 0
    done = fleet_of(("a", "reported", reported("a", "2")), ("b", "update", update("b", "active")),
                    ("b", "state", state("b", "2")))
    assert evaluate(record(wait_s=0), done.devices, T0 + 1).action == "complete"


def test_abort_at_the_threshold_once_min_devices_are_decided() -> None:
    rec = record(min_devices=5, max_failure_ratio=0.2, wait_s=0)
    ok = [(d, "state", state(d, "2")) for d in devices(4)]
    bad = [("bad0", "update", update("bad0", "rolled-back", code="health-check"))]
    decision = evaluate(rec, fleet_of(*ok, *bad, ("p", "state", state("p", "1"))).devices, T0 + 1)
    assert decision.action == "wait", decision  # 1 of 5 = 20 %: not above 20 %
    bad.append(("bad1", "update", update("bad1", "failed", code="hash-mismatch")))
    decision = evaluate(rec, fleet_of(*ok, *bad, ("p", "state", state("p", "1"))).devices, T0 + 1)
    assert decision.action == "abort" and "2 of 6 devices failed" in (decision.reason or ""), decision
    assert decision.devices["bad0"].code == "health-check" and decision.devices["bad1"].outcome == "failed"


def test_no_abort_before_min_devices_are_decided() -> None:
    rec = record(min_devices=5, wait_s=0)
    fleet = fleet_of(("bad0", "update", update("bad0", "rolled-back", code="health-check")),
                     ("bad1", "update", update("bad1", "failed", code="activation")),
                     *[(d, "state", state(d, "1")) for d in devices(5)])
    decision = evaluate(rec, fleet.devices, T0 + 1)
    assert decision.action == "wait" and decision.counts["failed"] == 2  # 2 decided < 5


def test_a_step_smaller_than_min_devices_is_judged_when_all_its_devices_are_done() -> None:
    rec = record(min_devices=5, wait_s=0)
    fleet = fleet_of(("a", "state", state("a", "2")), ("b", "state", state("b", "2")),
                     ("bad", "update", update("bad", "rolled-back", code="health-check")))
    decision = evaluate(rec, fleet.devices, T0 + 1)
    assert decision.action == "abort" and "1 of 3" in (decision.reason or "")


def test_silent_devices_fail_at_the_report_deadline_and_stay_failed_in_later_steps() -> None:
    rec = record([50.0, 100.0], min_devices=1, max_failure_ratio=0.5, wait_s=0, report_deadline_s=300)
    ids = [d for d in devices(40) if bucket(SALT, d) < 50][:4]
    quiet = ids[0]
    fleet = fleet_of(*[(d, "state", state(d, "2")) for d in ids[1:]], (quiet, "state", state(quiet, "1")))
    assert evaluate(rec, fleet.devices, T0 + 299).action == "wait"
    decision = evaluate(rec, fleet.devices, T0 + 301)
    assert decision.action == "advance" and decision.counts["no-report"] == 1 and decision.timed_out == [quiet]
    rec.step, rec.step_started_at, rec.timed_out = 1, T0 + 301, decision.timed_out
    later = evaluate(rec, fleet.devices, T0 + 302)
    assert later.devices[quiet].outcome == "no-report"  # not waited for again in the next step


def test_a_step_with_no_device_advances_when_its_wait_passes() -> None:
    ids = [d for d in devices(20) if bucket(SALT, d) >= 1][:5]
    fleet = fleet_of(*[(d, "state", state(d, "1")) for d in ids])
    rec = record([1.0, 100.0], wait_s=10)
    assert evaluate(rec, fleet.devices, T0 + 9).action == "wait"
    decision = evaluate(rec, fleet.devices, T0 + 10)
    assert decision.action == "advance" and decision.counts["in_step"] == 0


@pytest.mark.parametrize("skew", [-600.0, 600.0])
def test_device_clock_skew_of_ten_minutes_changes_nothing(skew: float) -> None:
    """Devices whose own clocks run ten minutes ahead or behind: the same decisions at the
    same hub times (a wait is neither skipped nor stretched)."""
    rec = record([50.0, 100.0], wait_s=60, min_devices=1)
    ids = devices(8)

    def decisions(offset: float) -> list[tuple[str, dict[str, int]]]:
        fleet = fleet_of(*[(d, kind, payload) for d in ids for kind, payload in (
            ("state", state(d, "2" if bucket(SALT, d) < 50 else "1", at=T0 + offset)),
            ("reported", reported(d, "2" if bucket(SALT, d) < 50 else "1", at=T0 + offset)),
            ("update", update(d, "active" if bucket(SALT, d) < 50 else "queued", at=T0 + offset)))])
        out: list[tuple[str, dict[str, int]]] = []
        for now in (T0 + 1, T0 + 59, T0 + 60, T0 + 700):
            d = evaluate(rec, fleet.devices, now)
            out.append((d.action, d.counts))
        return out

    assert decisions(skew) == decisions(0.0)
    assert [a for a, _ in decisions(skew)] == ["wait", "wait", "advance", "advance"]


def test_a_device_outside_the_step_serving_the_new_version_is_flagged_not_counted() -> None:
    outside = next(d for d in devices(50) if bucket(SALT, d) >= 10)
    fleet = fleet_of((outside, "reported", reported(outside, "2", desired="1")))
    decision = evaluate(record([10.0, 100.0], wait_s=0), fleet.devices, T0 + 1)
    assert decision.devices[outside].outcome == "unexpected"
    assert decision.devices[outside].code == "unexpected-version"
    assert decision.counts["unexpected"] == 1 and decision.counts["succeeded"] == 0


def test_a_failure_from_before_the_rollout_is_not_counted() -> None:
    """The retained update message of an earlier attempt (serial below the rollout's) is history."""
    fleet = fleet_of(("a", "update", update("a", "rolled-back", code="health-check", serial="5.0")))
    decision = evaluate(record(min_devices=1), fleet.devices, T0 + 1)
    assert decision.devices["a"].outcome == "pending"


def test_the_reported_state_says_succeeded_failed_and_in_progress() -> None:
    fleet = fleet_of(("ok", "reported", reported("ok", "2")),
                     ("busy", "reported", reported("busy", "1", job="downloading")),
                     ("bad", "reported", reported("bad", "1", last={"job": "j", "version": "2",
                                                                    "state": "rolled-back", "code": "health-check"})))
    decision = evaluate(record(min_devices=10), fleet.devices, T0 + 1)
    assert {d: o.outcome for d, o in decision.devices.items()} == {
        "ok": "succeeded", "busy": "in-progress", "bad": "failed"}


def test_devices_of_other_groups_are_not_part_of_it() -> None:
    fleet = fleet_of(("x", "state", state("x", "1", group="other")), ("a", "state", state("a", "2")))
    decision = evaluate(record(wait_s=0), fleet.devices, T0)
    assert list(decision.devices) == ["a"] and decision.action == "complete"


def test_a_paused_rollout_does_not_advance_but_still_aborts() -> None:
    rec = record(wait_s=0, min_devices=1)
    rec.state = "paused"
    assert evaluate(rec, fleet_of(("a", "state", state("a", "2"))).devices, T0 + 10).action == "wait"
    bad = fleet_of(("a", "update", update("a", "failed", code="activation")))
    assert evaluate(rec, bad.devices, T0 + 10).action == "abort"


# ---- messages that are not for us ---------------------------------------------------------------


def test_foreign_malformed_huge_and_misaddressed_messages_are_ignored_and_counted() -> None:
    fleet = FleetView(PREFIX)
    bad = {
        "malformed": [b"{not json", b"[1, 2]", b"\xff\xfe", json.dumps(
            {"schema": "edgefleet.reported/1", "device_id": "a", "group": "lab", "models": [1]}).encode()],
        "not-ours": [json.dumps({"schema": "acme.telemetry/3", "device_id": "a"}).encode(), b'{"models": {}}'],
        "too-large": [b'{"schema": "edgefleet.reported/1", "pad": "' + b"x" * MAX_MESSAGE_BYTES + b'"}'],
        "other-device": [reported("b", "2")],
    }
    for payloads in bad.values():
        for payload in payloads:
            assert fleet.ingest(f"{PREFIX}/devices/a/reported", payload, T0) is False
    assert fleet.ingest(f"{PREFIX}/devices/a b/reported", reported("a b", "2"), T0) is False
    assert fleet.ingest("elsewhere/devices/a/reported", reported("a", "2"), T0) is False
    assert dict(fleet.ignored) == {**{k: len(v) for k, v in bad.items()}, "unknown-device": 1,
                                   "other-topic": 1}
    assert fleet.devices == {}
    assert fleet.ingest(f"{PREFIX}/devices/a/reported", reported("a", "2"), T0) is True
    assert evaluate(record(wait_s=0), fleet.devices, T0).action == "complete"


# ---- the record outlives the controller ---------------------------------------------------------


def test_a_rollout_record_survives_a_restart_mid_step(tmp_path: Path) -> None:
    """A controller that dies mid-step and a new one (another process, the next boot) read the
    same record: the same step, the same start on the hub clock, the same timed-out devices."""
    store = RolloutStore(tmp_path)
    rec = record([10.0, 50.0, 100.0], wait_s=60, report_deadline_s=600)
    quiet = next(d for d in devices(30) if bucket(SALT, d) < 50)
    rec.step, rec.step_started_at, rec.timed_out = 1, T0 + 100, [quiet]
    with store.lock():
        store.save(rec)
    again = RolloutStore(tmp_path).load(rec.id)
    assert again == rec
    fleet = fleet_of(*[(d, "state", state(d, "1")) for d in devices(30)])
    decision = evaluate(again, fleet.devices, T0 + 400)
    assert decision.action == "wait" and decision.devices[quiet].outcome == "no-report"
    assert decision.counts["pending"] == decision.counts["in_step"] - 1
    assert evaluate(again, fleet.devices, T0 + 701).action == "abort"  # the deadline runs from T0 + 100
    assert not list(tmp_path.glob("rollouts/.*.tmp"))


# ---- the operator's commands against a real hub and a real broker -------------------------------


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = embedding_state(tmp_path_factory.mktemp("rollout-cli"))
    create_hub(root / "hub", root / "state", (EMBED,))
    return root


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], check=False, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def release(env: Path, version: str) -> Path:
    target = env / f"release-{version}"
    if not target.exists():
        make_release(env / "state/models" / EMBED / "current", target, version, onnx_note=f"release {version}")
    return target


def group_entry(env: Path) -> dict[str, Any]:
    state = current_desired(HubRepository(env / "hub"), "group", GROUP)
    assert state is not None
    return json.loads(state.to_json())["models"][EMBED]


@pytest.mark.parametrize(("args", "message"), [
    (["--steps", "50,10,100"], "must increase"),
    (["--steps", "1,10"], "last step must be 100"),
    (["--steps", "0,100"], "above 0"),
    (["--wait", "ten minutes"], "is not a duration"),
    (["--max-failure-ratio", "1.5"], "below 1"),
    (["--min-devices", "0"], "at least 1"),
    (["--report-deadline=-5m"], "is not a duration"),
    (["--report-deadline", "0s"], "--report-deadline must be above 0"),
])
def test_bad_rollout_settings_are_refused_with_exit_2_and_nothing_signed(
        hub_env: Path, args: list[str], message: str) -> None:
    done = cli("hub", "rollout", "start", "--hub", str(hub_env / "hub"), "--group", GROUP,
               "--version", f"{EMBED}=2", "--no-doorbell", *args)
    assert done.returncode == 2, done
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "rollout" not in group_entry(hub_env)


def test_start_signs_step_one_and_rings_pause_resume_then_abort_pins_back(
        hub_env: Path, mqtt_broker: MosquittoBroker) -> None:
    hub = str(hub_env / "hub")
    base = group_entry(hub_env)
    broker = f"{mqtt_broker.host}:{mqtt_broker.port}"
    with Watcher(mqtt_broker, f"{PREFIX}/groups/{GROUP}/desired") as watcher:
        done = cli("hub", "rollout", "start", "--hub", hub, "--group", GROUP, f"{EMBED}={release(hub_env, '2')}",
                   "--steps", "10,50,100", "--wait", "1m", "--mqtt", broker)
        assert done.returncode == 0, done
        rollout_id = re.search(r"rollout (r-[0-9a-f]+) started", done.stdout).group(1)  # type: ignore[union-attr]
        assert f"doorbell rung on {PREFIX}/groups/{GROUP}/desired" in done.stdout
        (bell,) = watcher.wait_for(f"{PREFIX}/groups/{GROUP}/desired", timeout_s=10)
    entry = group_entry(hub_env)
    assert entry["version"] == base["version"] and entry["serial"] == base["serial"]  # the base stays
    rollout = entry["rollout"]
    assert rollout["id"] == rollout_id and rollout["version"] == "2" and rollout["percent"] == 10.0
    assert json.loads(bell.payload)["serial"] == rollout["serial"]
    # nobody else moves this model meanwhile
    done = cli("hub", "publish", "--hub", hub, "--group", GROUP, f"{EMBED}={release(hub_env, '3')}", "--no-doorbell")
    assert done.returncode == 1 and f"edgefleet hub rollout abort {rollout_id}" in done.stderr, done
    assert group_entry(hub_env)["rollout"]["version"] == "2"
    done = cli("hub", "rollout", "start", "--hub", hub, "--group", GROUP, f"{EMBED}={release(hub_env, '3')}",
               "--no-doorbell")
    assert done.returncode == 1 and f"abort it first (`edgefleet hub rollout abort {rollout_id}`)" in done.stderr

    assert cli("hub", "rollout", "pause", "--hub", hub, rollout_id).returncode == 0
    again = cli("hub", "rollout", "pause", "--hub", hub, rollout_id)
    assert again.returncode == 1 and "paused already" in again.stderr
    status = json.loads(cli("hub", "rollout", "status", "--hub", hub, rollout_id, "--json").stdout)
    assert status["state"] == "paused" and status["plan"]["steps"] == [10.0, 50.0, 100.0] and status["step"] == 0
    assert cli("hub", "rollout", "resume", "--hub", hub, rollout_id).returncode == 0
    text = cli("hub", "rollout", "status", "--hub", hub, rollout_id).stdout
    assert f"rollout {rollout_id}: group {GROUP}, {EMBED} {base['version']} -> 2: running" in text, text

    done = cli("hub", "rollout", "abort", "--hub", hub, rollout_id, "--mqtt", broker)
    assert done.returncode == 0 and "pinned to" in done.stdout, done
    entry = group_entry(hub_env)
    assert "rollout" not in entry and entry["pin"] is True and entry["version"] == base["version"]
    status = json.loads(cli("hub", "rollout", "status", "--hub", hub, rollout_id, "--json").stdout)
    assert status["state"] == "aborted" and status["reason"] == "aborted by the operator"
    # the model is free again
    done = cli("hub", "publish", "--hub", hub, "--group", GROUP, f"{EMBED}={release(hub_env, '3')}", "--no-doorbell")
    assert done.returncode == 0, done


def test_the_controller_step_signs_the_next_share_then_completes(tmp_path: Path) -> None:
    """What the controller does at each decision, on a real hub: the rollout's serial stays the
    one it started at, the base entry keeps its own; completion makes the new version the base."""
    root = embedding_state(tmp_path)
    repo = create_hub(root / "hub", root / "state", (EMBED,))
    store = RolloutStore(repo.dir)
    target = rollout_target(repo, BundleSource(release(root, "2"), EMBED))
    plan = Plan([50.0, 100.0], 0.0, 0.1, 1, 600.0)
    rec, first = actions.start(repo, store, GROUP, target, plan, T0)
    ids = [f"dev-{i}" for i in range(6)]
    fleet = fleet_of(*[(d, "state", state(d, "2" if bucket(rec.salt, d) < 50 else "1")) for d in ids])
    for view in fleet.devices.values():
        view.group = GROUP
    rec, decision, result = actions.step(repo, store, rec.id, fleet.devices, T0 + 1)
    assert decision is not None and decision.action == "advance" and result is not None
    entry = group_entry(root)
    assert entry["rollout"]["percent"] == 100.0 and entry["rollout"]["serial"] == first.serial
    assert rec.step == 1 and rec.step_started_at == T0 + 1
    fleet = fleet_of(*[(d, "state", state(d, "2")) for d in ids])
    for view in fleet.devices.values():
        view.group = GROUP
    rec, decision, result = actions.step(repo, store, rec.id, fleet.devices, T0 + 2)
    assert rec.state == "completed" and result is not None
    entry = group_entry(root)
    assert entry == {"version": "2", "files": entry["files"], "serial": first.serial}
    assert RolloutStore(repo.dir).load(rec.id).state == "completed"


# ---- end to end: real agents, a real broker, a real hub, the real controller --------------------

AGENTS = ("press-1", "press-2", "press-3", "press-4")


class Fleet:
    """Four agents (the embedding model only), `hub serve` and `hub control`, all real processes.
    `broker`: a mosquitto, or anything of its shape (tests/rabbitmq_broker.py, with `protocol`
    MQTTv311 for the watcher)."""

    def __init__(self, root: Path, broker: Any, devices: tuple[str, ...] = AGENTS,
                 protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5) -> None:
        self.root, self.broker = root, broker
        self.hub = root / "hub"
        self.devices = devices
        self.procs: list[subprocess.Popen[bytes]] = []
        self.agents: dict[str, ServiceProcess] = {}
        self.watcher = Watcher(broker, f"{PREFIX}/devices/+/reported", f"{PREFIX}/devices/+/update",
                               f"{PREFIX}/groups/+/desired", protocol=protocol)

    def start(self) -> None:
        embedding_state(self.root / "seed")
        create_hub(self.hub, self.root / "seed/state", (EMBED,))
        hub_port = free_port()
        self.procs.append(self._spawn("hub", ["hub", "serve", "--hub", str(self.hub), "--port", str(hub_port)]))
        self.procs.append(self._spawn("control", ["hub", "control", "--hub", str(self.hub), "--mqtt", self.mqtt,
                                                  "--interval", "0.5s"]))
        self.watcher.__enter__()
        for device in self.devices:
            home = embedding_state(self.root / device)
            extra = (f'[mqtt]\nhost = "{self.broker.host}"\nport = {self.broker.port}\ndevice_id = "{device}"\n'
                     f'group = "{GROUP}"\nreconnect_min_s = 0.2\nreconnect_max_s = 1.0\n'
                     f'[updates]\nhub_url = "http://127.0.0.1:{hub_port}"\ntrust_root = "{self.hub}/trust-root.json"\n'
                     "health_checks = 2\nhealth_check_interval_s = 0.1\nmin_free_mb = 0\ncheck_interval_s = 20\n")
            config = write_config(home / "agent.toml", home / "state", free_port(), [EMBED], extra=extra)
            (home / "log").mkdir()
            self.agents[device] = ServiceProcess(config, home / "log")
        for device in self.devices:
            self.until(lambda d=device: self.active(d) == V1, f"{device} serving {V1}", 180)

    @property
    def mqtt(self) -> str:
        return f"{self.broker.host}:{self.broker.port}"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("wb")
        return subprocess.Popen([sys.executable, "-m", "agent", *args], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT)

    def stop(self) -> None:
        self.watcher.__exit__()
        for agent in self.agents.values():
            agent.stop()
        for proc in self.procs:
            proc.terminate()
            assert proc.wait(30) == 0, f"{proc.args!r} exited {proc.returncode}"  # SIGTERM: a clean exit

    def reported(self, device: str) -> dict[str, Any]:
        got = self.watcher.on(f"{PREFIX}/devices/{device}/reported")
        return json.loads(got[-1].payload) if got else {}

    def active(self, device: str) -> str | None:
        return ((self.reported(device).get("models") or {}).get(EMBED) or {}).get("active")

    def until(self, check: Any, what: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            dead = {d: a.log()[-1500:] for d, a in self.agents.items() if a.proc.poll() is not None}
            assert not dead, f"agents exited: {dead}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s}s; agent logs: " \
                f"{ {d: a.log()[-1500:] for d, a in self.agents.items()} }; controller: " \
                f"{(self.root / 'control.log').read_text()[-3000:]}"
            time.sleep(0.2)

    def rollout_list(self) -> dict[str, Any]:
        done = cli("hub", "rollout", "status", "--hub", str(self.hub), "--json")
        assert done.returncode == 0, done
        return json.loads(done.stdout)

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        done = cli("hub", "rollout", "status", "--hub", str(self.hub), rollout_id, "--json")
        assert done.returncode == 0, done
        return json.loads(done.stdout)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("rollout-e2e")
    broker = MosquittoBroker(root)
    broker.start()
    fleet = Fleet(root, broker)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()
        broker.stop()


def test_a_staged_rollout_moves_a_share_then_the_rest_and_completes(fleet: Fleet) -> None:
    bundle = make_release(fleet.root / "seed/state/models" / EMBED / "current", fleet.root / "release-2", "2",
                          onnx_note="release 2")
    done = cli("hub", "rollout", "start", "--hub", str(fleet.hub), "--group", GROUP, f"{EMBED}={bundle}",
               "--steps", "34,100", "--wait", "2s", "--min-devices", "2", "--mqtt", fleet.mqtt)
    assert done.returncode == 0, done
    rollout_id = re.search(r"rollout (r-[0-9a-f]+) started", done.stdout).group(1)  # type: ignore[union-attr]
    fleet.until(lambda: fleet.rollout(rollout_id)["state"] != "running", "the end of the rollout", 240)
    record = fleet.rollout(rollout_id)
    assert record["state"] == "completed", record
    assert [h["percent"] for h in record["history"] if h["event"] == "step"] == [34.0, 100.0]
    for device in AGENTS:
        fleet.until(lambda d=device: fleet.active(d) == "2", f"{device} serving 2")
        desired = fleet.reported(device)["models"][EMBED]["desired"]
        assert desired["version"] == "2", desired
    entry = group_entry(fleet.root)
    assert entry["version"] == "2" and "rollout" not in entry
    # devices outside the first 34 % only started once step 2 was signed (and its doorbell rung)
    bells = [m for m in fleet.watcher.on(f"{PREFIX}/groups/{GROUP}/desired")
             if json.loads(m.payload).get("serial") == record["history"][1]["serial"]]
    assert bells, "the controller rang no doorbell for step 2"
    salt = record["salt"]
    for device in AGENTS:
        if bucket(salt, device) >= 34:
            queued = [m for m in fleet.watcher.on(f"{PREFIX}/devices/{device}/update")
                      if json.loads(m.payload).get("version") == "2" and json.loads(m.payload)["state"] == "queued"]
            assert queued and fleet.watcher.messages.index(queued[0]) > fleet.watcher.messages.index(bells[0])
    # and the operator's view says so
    status = cli("hub", "status", "--hub", str(fleet.hub), "--mqtt", fleet.mqtt, "--json", "--wait", "2")
    rows = {r["device"]: r for r in json.loads(status.stdout)}
    assert all(rows[d]["models"][EMBED] == "2" and rows[d]["desired"][EMBED]["version"] == "2"
               and rows[d]["flags"] == {} for d in AGENTS), rows


def test_a_release_that_fails_its_probe_aborts_and_every_device_stays_on_or_goes_back_to_the_last(
        fleet: Fleet) -> None:
    bundle = make_release(fleet.root / "seed/state/models" / EMBED / "current", fleet.root / "release-3", "3",
                          toml=lambda t: t.replace("bytes_per_token = 8192", "bytes_per_token = 1000000000000000"))
    done = cli("hub", "rollout", "start", "--hub", str(fleet.hub), "--group", GROUP, f"{EMBED}={bundle}",
               "--steps", "50,100", "--wait", "2s", "--min-devices", "2", "--max-failure-ratio", "0.2",
               "--mqtt", fleet.mqtt)
    assert done.returncode == 0, done
    rollout_id = re.search(r"rollout (r-[0-9a-f]+) started", done.stdout).group(1)  # type: ignore[union-attr]
    fleet.until(lambda: fleet.rollout(rollout_id)["state"] != "running", "the end of the rollout", 240)
    record = fleet.rollout(rollout_id)
    assert record["state"] == "aborted" and "automatic abort" in record["reason"], record
    failing = record["failing"]
    assert failing and all(f["outcome"] == "failed" for f in failing.values()), failing
    entry = group_entry(fleet.root)
    assert entry["version"] == "2" and entry["pin"] is True and "rollout" not in entry
    for device in AGENTS:
        fleet.until(lambda d=device: (fleet.reported(d).get("models", {}).get(EMBED, {}).get("desired") or {})
                    .get("origin") == "pin", f"{device} told the pin")
        assert fleet.active(device) == "2"
    moved = [d for d in AGENTS if any(json.loads(m.payload).get("version") == "3"
                                      for m in fleet.watcher.on(f"{PREFIX}/devices/{d}/update"))]
    # the abort comes as soon as the rule trips: a device of the step may still have been at it
    last_share = [h["percent"] for h in record["history"] if h["event"] == "step"][-1]
    assert set(failing) <= set(moved), (moved, failing)
    assert all(bucket(record["salt"], d) < last_share for d in moved), (moved, last_share)
    codes = {f.get("code") for f in failing.values()}
    assert codes == {"health-check"}, failing


def test_junk_on_the_report_topics_is_counted_and_a_killed_controller_picks_up_mid_step(fleet: Fleet) -> None:
    """Messages that are not ours, malformed, huge or for another device are counted, not fatal;
    a controller killed (SIGKILL) mid-step and started again finishes the rollout from its record."""
    with Watcher(fleet.broker) as junk:
        junk.publish(f"{PREFIX}/devices/press-1/reported", b"{broken", retain=False)
        junk.publish(f"{PREFIX}/devices/press-1/reported", b'{"schema": "acme/9"}', retain=False)
        junk.publish(f"{PREFIX}/devices/press-1/reported", b'{"schema": "edgefleet.reported/1", "x": "'
                     + b"y" * 70_000 + b'"}', retain=False)
        junk.publish(f"{PREFIX}/devices/press-1/reported", reported("press-9", "2"), retain=False)
    fleet.until(lambda: sum((fleet.rollout_list()["controller"] or {}).get("ignored", {}).values()) >= 4,
                "the junk counted")
    ignored = fleet.rollout_list()["controller"]["ignored"]
    assert {"malformed", "not-ours", "too-large", "other-device"} <= set(ignored), ignored
    control = fleet.procs[1]
    assert control.poll() is None, "the controller died of junk"

    bundle = make_release(fleet.root / "seed/state/models" / EMBED / "current", fleet.root / "release-4", "4",
                          onnx_note="release 4")
    done = cli("hub", "rollout", "start", "--hub", str(fleet.hub), "--group", GROUP, f"{EMBED}={bundle}",
               "--steps", "50,100", "--wait", "3s", "--min-devices", "2", "--mqtt", fleet.mqtt)
    assert done.returncode == 0, done
    rollout_id = re.search(r"rollout (r-[0-9a-f]+) started", done.stdout).group(1)  # type: ignore[union-attr]
    control.kill()  # mid-step: no goodbye, no chance to save anything more
    control.wait()
    assert fleet.rollout(rollout_id)["state"] == "running" and fleet.rollout(rollout_id)["step"] == 0
    fleet.procs[1] = fleet._spawn("control-2", ["hub", "control", "--hub", str(fleet.hub), "--mqtt", fleet.mqtt,
                                                "--interval", "0.5s"])
    fleet.until(lambda: fleet.rollout(rollout_id)["state"] != "running", "the end of the rollout", 240)
    record = fleet.rollout(rollout_id)
    assert record["state"] == "completed", record
    assert record["history"][0]["serial"] == group_entry(fleet.root)["serial"]  # the rollout's serial, kept
    for device in AGENTS:
        fleet.until(lambda d=device: fleet.active(d) == "4", f"{device} serving 4")
