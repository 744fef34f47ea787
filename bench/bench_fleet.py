"""Fleet scale: one hub and one broker rolling a release out to 100, 300, 1,000 simulated devices.

    .venv/bin/python bench/bench_fleet.py --devices 100 300 [--size-mb 20] [--per-worker 250]
    .venv/bin/python bench/bench_fleet.py --devices 300 --fault broker-restart
    .venv/bin/python bench/bench_fleet.py --devices 300 --fault probe

Every device is bench/fleet_sim.py's: the agent's real MQTT link, TUF client, downloader,
update state machine, store, registry and reported state, with a stand-in for inference;
several worker processes of --per-worker devices each. Everything else is what an operator
runs, on loopback: a mosquitto (persistence on, $SYS every second, no connection limit),
`edgefleet hub init`, `edgefleet hub publish` of the base release (64 KiB), `edgefleet hub
serve` in its own process, and for the measured step the rollout command a user types:
`edgefleet hub rollout start --group G BUNDLE --steps 100` where that command exists, else
`edgefleet hub publish --group G BUNDLE` (one step at 100 % is the same thing); the bench
says which it used.

Printed per size: the time from the rollout command to every device reporting the new
version active (read from MQTT as an operator's subscriber sees it: the retained reported
state, and the update topic), the hub server's bytes written (/proc/PID/io wchar, which
counts sendfile) and CPU seconds, the broker's messages per second ($SYS counters), and the
workers' RSS per device. Each device stores its own copy of the release (20 MB x devices on
disk); every state directory is deleted when its size is done.

Faults:
- ``--fault broker-restart``: once half the devices have reported a job under way
  (mid-download), mosquitto is stopped (it saves its persistence file) and started again
  after --outage-s; every device must end active, none with a job or a report still
  pending, and the update reports each device sent must all arrive (their ``seq`` numbers
  have no gap).
- ``--fault probe``: every 20th device's probe fails on the new release; the rollout runs
  with steps 10,50,100, --max-failure-ratio 0.02, --min-devices 10 under the hub's
  controller. It must abort at the first step whose share of failing devices passes the
  threshold (the bench works the steps' devices out from the rollout's salt; the controller
  judges the share as reports arrive, so it may stop earlier, at a step whose first
  reports were failures, never at a step without one), and every device that moved must
  go back. Needs `hub rollout` and `hub control`; without them it says so and stops.

The bench exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import paho.mqtt.client as paho  # noqa: E402
import psutil  # noqa: E402
from mqtt_broker import MosquittoBroker, free_port  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from bench.fleet_sim import write_release  # noqa: E402
from security.desired import bucket  # noqa: E402

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
GROUP = "fleet"
PREFIX = "edgefleet/v1"
MODEL = "sim-model"
BASE = "1"
BROKER_CONFIG = """persistence true
persistence_location {dir}/
autosave_interval 3600
sys_interval 1
max_connections -1
max_queued_messages 100000
set_tcp_nodelay true
"""


def cli(*args: str, timeout_s: float = 120) -> tuple[str, float]:
    """Run `edgefleet ARGS`; returns its stdout and wall seconds (raises with its stderr on failure)."""
    started = time.monotonic()
    proc = subprocess.run([EDGEFLEET, *args], check=False, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"edgefleet {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout, time.monotonic() - started


def has_command(*words: str) -> bool:
    proc = subprocess.run([EDGEFLEET, *words, "--help"], check=False, capture_output=True, text=True)
    return proc.returncode == 0


# ---- what an operator's subscriber sees ---------------------------------------------------------


@dataclass
class FleetWatcher:
    """One MQTT 5 subscriber with a persistent session (it misses nothing across a broker
    restart): update reports, reported states, birth/will, and the broker's $SYS counters."""

    broker: MosquittoBroker
    target: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    seqs: dict[str, set[int]] = field(default_factory=dict)
    updates: dict[str, dict[str, Any]] = field(default_factory=dict)
    reported: dict[str, dict[str, Any]] = field(default_factory=dict)
    online: dict[str, bool] = field(default_factory=dict)
    active_at: dict[str, float] = field(default_factory=dict)  # update topic: state active, target version
    reported_at: dict[str, float] = field(default_factory=dict)  # reported: active == target, no job
    sys: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    update_messages: int = 0
    #: device -> broker PUBLISHes seen (update, reported, state), with the time each arrived
    device_publishes: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"fleet-bench-{os.getpid()}",
                             protocol=MQTTProtocolVersion.MQTTv5)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.reconnect_delay_set(1, 2)
        self.client = client

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect_async(self.broker.host, self.broker.port, clean_start=False, properties=props)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: paho.Client, *args: Any) -> None:
        client.subscribe([(f"{PREFIX}/devices/+/update", 1), (f"{PREFIX}/devices/+/reported", 1),
                          (f"{PREFIX}/devices/+/state", 1), ("$SYS/broker/messages/+", 0),
                          ("$SYS/broker/publish/messages/+", 0), ("$SYS/broker/clients/connected", 0)])

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        now = time.monotonic()
        topic = msg.topic
        if topic.startswith("$SYS/"):
            with contextlib.suppress(ValueError), self.lock:
                self.sys.setdefault(topic[len("$SYS/broker/"):], []).append((now, float(msg.payload)))
            return
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        device = topic.split("/")[-2]
        kind = topic.rsplit("/", 1)[-1]
        with self.lock:
            if not msg.retain:
                self.device_publishes.append(now)
            if kind == "update":
                self.update_messages += 1
                if isinstance(body.get("seq"), int):
                    self.seqs.setdefault(device, set()).add(body["seq"])
                if body.get("seq", 0) >= self.updates.get(device, {}).get("seq", 0):
                    self.updates[device] = body
                if body.get("state") == "active" and body.get("version") == self.target:
                    self.active_at.setdefault(device, now)
            elif kind == "reported":
                if body.get("seq", 0) >= self.reported.get(device, {}).get("seq", 0):
                    self.reported[device] = body
                model = (body.get("models") or {}).get(MODEL) or {}
                if model.get("active") == self.target and model.get("job") is None:
                    self.reported_at.setdefault(device, now)
            elif kind == "state":
                self.online[device] = bool(body.get("online"))

    def moving(self) -> int:
        """Devices whose last update report is a job under way or done toward the target."""
        with self.lock:
            return sum(1 for u in self.updates.values() if u.get("version") == self.target and u.get("state") in
                       ("downloading", "verifying", "staged", "activating", "health-check", "active"))

    def latest_reported(self, n: int) -> list[dict[str, Any] | None]:
        """The last reported state of each of the `n` devices (None: none yet)."""
        with self.lock:
            return [self.reported.get(f"sim-{i:04d}") for i in range(n)]

    def counter(self, name: str, at: float, after: bool) -> tuple[float, float] | None:
        """The $SYS sample of `name` last before `at` (or first after it)."""
        with self.lock:
            samples = list(self.sys.get(name, []))
        if after:
            return next(((t, v) for t, v in samples if t >= at), None)
        return next(((t, v) for t, v in reversed(samples) if t <= at), None)

    def gaps(self) -> dict[str, list[int]]:
        """Per device, the update report seq numbers missing below the highest that arrived."""
        with self.lock:
            return {d: sorted(set(range(1, max(s) + 1)) - s) for d, s in self.seqs.items() if s and
                    set(range(1, max(s) + 1)) - s}


# ---- worker processes -------------------------------------------------------------------------


class Worker:
    """One bench/fleet_sim.py process; its JSON lines arrive on a queue."""

    def __init__(self, config: dict[str, Any], path: Path, log: Path) -> None:
        path.write_text(json.dumps(config))
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fleet_sim.py"), str(path)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.events.put(json.loads(line))
        self.events.put({"event": "exited", "rc": self.proc.wait()})

    def expect(self, event: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                got = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"worker {self.proc.pid}: no {event} within {timeout_s:.0f}s") from None
            if got["event"] == event:
                return got
            if got["event"] == "exited":
                raise RuntimeError(f"worker {self.proc.pid} exited ({got['rc']}): "
                                   f"{self.log.read_text()[-1500:]}")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()

    def close(self, timeout_s: float = 120) -> None:
        self.send("stop")
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- one fleet ----------------------------------------------------------------------------------


@dataclass
class Fleet:
    n: int
    args: argparse.Namespace
    work: Path
    broker: MosquittoBroker | None = None
    hub: subprocess.Popen[str] | None = None
    watcher: FleetWatcher | None = None
    controller: subprocess.Popen[bytes] | None = None
    workers: list[Worker] = field(default_factory=list)

    @property
    def hub_dir(self) -> Path:
        return self.work / "hub"

    def device_ids(self) -> list[str]:
        return [f"sim-{i:04d}" for i in range(self.n)]

    def workers_needed(self) -> int:
        """At least two (two cores), else one per --per-worker devices."""
        return max(2, -(-self.n // self.args.per_worker))

    def failing(self) -> set[str]:
        return {d for i, d in enumerate(self.device_ids()) if self.args.fault == "probe" and i % 20 == 0}

    def up(self, target: str) -> dict[str, Any]:
        args = self.args
        (self.work / "mosquitto").mkdir()
        self.broker = MosquittoBroker(self.work, extra_config=BROKER_CONFIG.format(dir=self.work / "mosquitto"))
        self.broker.start()
        cli("hub", "init", "--hub", str(self.hub_dir))
        base = write_release(self.work / f"release-{BASE}", BASE, 64 * 1024)
        write_release(self.work / f"release-{target}", target, args.size_mb << 20)
        cli("hub", "publish", "--hub", str(self.hub_dir), "--group", GROUP, f"{MODEL}={base}",
            "--mqtt", f"{self.broker.host}:{self.broker.port}")
        port = free_port()
        self.hub = subprocess.Popen([EDGEFLEET, "hub", "serve", "--hub", str(self.hub_dir), "--port", str(port)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.hub.stdout is not None
        banner = self.hub.stdout.readline()
        if "serving" not in banner:
            raise RuntimeError(f"hub serve: {banner}")
        self.watcher = FleetWatcher(self.broker, target=target)
        self.watcher.start()
        ids = self.device_ids()
        failing = self.failing()
        common = {"broker_host": self.broker.host, "broker_port": self.broker.port, "group": GROUP,
                  "prefix": PREFIX, "model": MODEL, "hub_url": f"http://127.0.0.1:{port}",
                  "trust_root": str(self.hub_dir / "trust-root.json"), "base_bundle": str(base),
                  "updates": {"health_check_interval_s": 1.0, "min_free_mb": 256}}
        started = time.monotonic()
        for w in range(self.workers_needed()):
            devices = [{"id": d, "state_dir": str(self.work / "devices" / d),
                        "fail_probe": [target] if d in failing else []} for d in ids[w::self.workers_needed()]]
            self.workers.append(Worker({"common": common, "devices": devices, "threads": args.threads,
                                        "ready_timeout_s": args.timeout_s},
                                       self.work / f"worker-{w}.json", self.work / f"worker-{w}.log"))
        ready = [w.expect("ready", args.timeout_s + 60) for w in self.workers]
        not_ready = [d for r in ready for d in r["not_ready"]]
        if not_ready:
            raise RuntimeError(f"{len(not_ready)} devices never finished their first look at the hub: {not_ready[:5]}")
        return {"start_s": time.monotonic() - started, "ready": ready, "reported": all(r["reported"] for r in ready)}

    def start_controller(self) -> None:
        """`edgefleet hub control`, as an operator runs it beside the hub (its log in the work dir)."""
        assert self.broker is not None
        with open(self.work / "controller.log", "wb") as log:
            self.controller = subprocess.Popen(
                [EDGEFLEET, "hub", "control", "--hub", str(self.hub_dir), "--interval", "1s",
                 "--mqtt", f"{self.broker.host}:{self.broker.port}"], stdout=log, stderr=log)

    def rollout(self) -> dict[str, Any] | None:
        """The one rollout's record, as the hub keeps it (what `hub rollout status --json` reads)."""
        for path in sorted((self.hub_dir / "rollouts").glob("r-*.json")):
            with contextlib.suppress(OSError, ValueError):
                return dict(json.loads(path.read_text()))
        return None

    def stats(self) -> list[dict[str, Any]]:
        for w in self.workers:
            w.send("stats")
        return [w.expect("stats", 120) for w in self.workers]

    def down(self) -> None:
        for w in self.workers:
            w.send("stop")
        for w in self.workers:
            w.close()
        if self.controller is not None:
            self.controller.terminate()
            self.controller.wait(10)
        if self.watcher is not None:
            self.watcher.stop()
        if self.hub is not None:
            self.hub.terminate()
            self.hub.wait(10)
        if self.broker is not None:
            self.broker.stop()


def rollout_command(fleet: Fleet, bundle: Path, steps: str | None, extra: list[str]) -> tuple[list[str], str]:
    """The command line a user types for the rollout, and what it is."""
    assert fleet.broker is not None
    mqtt = ["--mqtt", f"{fleet.broker.host}:{fleet.broker.port}"]
    if has_command("hub", "rollout", "start"):
        return (["hub", "rollout", "start", "--hub", str(fleet.hub_dir), "--group", GROUP, f"{MODEL}={bundle}",
                 "--steps", steps or "100", *extra, *mqtt], "hub rollout start, with `hub control` running")
    return (["hub", "publish", "--hub", str(fleet.hub_dir), "--group", GROUP, f"{MODEL}={bundle}", *mqtt],
            "hub publish (no `hub rollout` in this tree)")


def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"fleet-{n}-", dir=args.workdir))
    fleet = Fleet(n, args, work)
    target = "2"
    figures: dict[str, Any] = {"devices": n, "workers": fleet.workers_needed()}
    try:
        up = fleet.up(target)
        assert fleet.watcher is not None and fleet.broker is not None and fleet.hub is not None
        figures["start_s"] = up["start_s"]
        watcher = fleet.watcher
        time.sleep(args.sys_wait_s)  # $SYS samples before the start
        hub = psutil.Process(fleet.hub.pid)
        cpu0, io0 = sum(hub.cpu_times()[:2]), hub.io_counters().write_chars
        staged = args.fault == "probe"
        if staged and not has_command("hub", "rollout", "start"):
            raise SystemExit("--fault probe needs `edgefleet hub rollout` and `edgefleet hub control`, "
                             "which this tree does not have")
        plan = (["--wait", "5s", "--max-failure-ratio", "0.02", "--min-devices", "10", "--report-deadline", "5m"]
                if staged else ["--wait", "10s"])
        command, used = rollout_command(fleet, work / f"release-{target}", "10,50,100" if staged else "100", plan)
        if command[:2] == ["hub", "rollout"]:
            fleet.start_controller()
            time.sleep(3)  # the controller connects and reads the retained states first
        figures["command"] = "edgefleet " + " ".join(command)
        figures["used"] = used
        controller = psutil.Process(fleet.controller.pid) if fleet.controller is not None else None
        ctl0 = sum(controller.cpu_times()[:2]) if controller else 0.0
        machine0, disk0 = psutil.cpu_times(), psutil.disk_io_counters()
        t0 = time.monotonic()
        _, figures["command_s"] = cli(*command)
        restarted = finished_s = None
        deadline = t0 + args.timeout_s
        done = watcher.reported_at if up["reported"] else watcher.active_at
        record = None
        while time.monotonic() < deadline:
            if fleet.controller is not None:
                record = fleet.rollout()
                if finished_s is None and record and record["state"] in ("completed", "aborted"):
                    finished_s = time.monotonic() - t0
            if staged:
                if finished_s is not None and all(_serves(r, BASE) for r in watcher.latest_reported(fleet.n)):
                    break
            elif len(done) >= n and (fleet.controller is None or finished_s is not None):
                break
            if args.fault == "broker-restart" and restarted is None and watcher.moving() >= n // 2:
                restarted = time.monotonic() - t0
                fleet.broker.stop()
                time.sleep(args.outage_s)
                fleet.broker.start()
            time.sleep(0.2)
        t_all = max(done.values(), default=t0) - t0 if len(done) == n else None
        if staged:
            t_all = time.monotonic() - t0 if finished_s is not None else None  # all back on the base version
            figures["abort"] = abort_check(record, fleet, watcher)
        cpu1, io1 = sum(hub.cpu_times()[:2]), hub.io_counters().write_chars
        machine1, disk1 = psutil.cpu_times(), psutil.disk_io_counters()
        assert fleet.broker.proc is not None
        figures["broker_rss"] = psutil.Process(fleet.broker.proc.pid).memory_info().rss
        figures["hub_rss"] = hub.memory_info().rss
        figures["controller_cpu_s"] = sum(controller.cpu_times()[:2]) - ctl0 if controller else None
        # where the machine's time went in the window (both cores, every process): is it the CPU or the disk?
        figures["machine"] = {k: getattr(machine1, k) - getattr(machine0, k)
                              for k in ("user", "system", "iowait", "idle", "softirq")}
        if disk0 is not None and disk1 is not None:
            figures["disk_written"] = disk1.write_bytes - disk0.write_bytes
        time.sleep(args.sys_wait_s)  # the next $SYS samples
        figures.update(
            active=len(done), seconds=t_all, hub_cpu_s=cpu1 - cpu0, hub_written=io1 - io0,
            update_topic_s=(max(watcher.active_at.values()) - t0) if len(watcher.active_at) == n else None,
            restarted_at_s=restarted, finished_s=finished_s, rollout_state=record and record["state"],
            rollout_reason=record and record.get("reason"),
        )
        end = t0 + (t_all or args.timeout_s)
        for name in ("publish/messages/received", "publish/messages/sent", "messages/received", "messages/sent"):
            # $SYS says a counter every second while it changes: its value at t0 is the last before
            # it; at the end, the last within one interval after (the window's last second)
            a, b = watcher.counter(name, t0, after=False), watcher.counter(name, end + 1.0, after=False)
            if a and b and b[1] >= a[1] and restarted is None:  # a restart starts the counters again
                figures[name] = (b[1] - a[1]) / (end - t0)
        with watcher.lock:
            figures["device_publishes"] = sum(1 for t in watcher.device_publishes if t0 <= t <= end) / (end - t0)
        stats = fleet.stats()
        devices = [d for s in stats for d in s["devices"]]
        figures["rss_per_device"] = sum(s["rss"] for s in stats) / n
        figures["rss_base"] = sum(r["rss_base"] for r in up["ready"]) / len(up["ready"])
        figures["rss_added_per_device"] = (sum(s["rss"] for s in stats) - figures["rss_base"] * len(stats)) / n
        figures["worker_cpu_s"] = sum(s["cpu"] for s in stats)
        figures["downloaded"] = sum(d.get("downloaded", 0) for d in devices)
        figures["stuck"] = [d["device"] for d in devices if d.get("jobs") or d.get("reports_pending")]
        figures["not_active"] = [d["device"] for d in devices if d["active"] != (BASE if staged else target)]
        figures["disconnects"] = sum(d["disconnects"] for d in devices)
        figures["dropped_inbound"] = sum(d["dropped_inbound"] for d in devices)
        figures["report_gaps"] = watcher.gaps()
        figures["update_messages"] = watcher.update_messages
        figures["disk_used"] = _du(work / "devices")
        if os.environ.get("FLEET_BENCH_DEBUG"):
            print({k: [(round(t - t0, 1), x) for t, x in v] for k, v in watcher.sys.items()}, file=sys.stderr)
    finally:
        fleet.down()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return figures


def _serves(reported: dict[str, Any] | None, version: str) -> bool:
    model = ((reported or {}).get("models") or {}).get(MODEL) or {}
    return model.get("active") == version and model.get("job") is None


def abort_check(record: dict[str, Any] | None, fleet: Fleet, watcher: FleetWatcher) -> dict[str, Any]:
    """Where the rollout stopped against where it had to: per step, the devices in it (their
    bucket under the rollout's salt below the step's share) and how many of them fail."""
    if record is None:
        return {"error": "no rollout record"}
    failing = fleet.failing()
    plan = record["plan"]
    steps = []
    first_past = None
    for k, percent in enumerate(plan["steps"]):
        members = [d for d in fleet.device_ids() if bucket(record["salt"], d) < percent]
        bad = sum(1 for d in members if d in failing)
        steps.append({"percent": percent, "devices": len(members), "failing": bad})
        # judged once all of the step's devices are decided (a step smaller than min_devices too)
        if first_past is None and members and bad / len(members) > plan["max_failure_ratio"]:
            first_past = k
    moved = set(watcher.active_at)
    latest = dict(zip(fleet.device_ids(), watcher.latest_reported(fleet.n), strict=True))
    return {"state": record["state"], "stopped_at_step": record["step"], "first_step_past_threshold": first_past,
            "steps": steps, "counts": record.get("counts"), "reason": record.get("reason"),
            "moved": len(moved), "moved_not_back": sorted(d for d in moved if not _serves(latest[d], BASE))}


def _du(path: Path) -> int:
    """Bytes on disk under `path`, each inode once (a version's files are hard links to blobs)."""
    seen = {}
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return sum(seen.values())


def report(f: dict[str, Any]) -> bool:
    """Print one size's figures; False when a check failed."""
    mb = 1e6
    n = f["devices"]
    print(f"\n== {n} devices ({f['workers']} worker processes), release of {f['size_mb']} MiB ==")
    print(f"  started and through their first look at the hub in {f['start_s']:.1f} s")
    print(f"  rollout: `{f['command']}` ({f['used']}; the command took {f['command_s']:.1f} s)")
    if "abort" in f:
        pass
    elif f["seconds"] is not None:
        topic = f" (update topic: {f['update_topic_s']:.1f} s)" if f["update_topic_s"] is not None else ""
        print(f"  every device reporting active: {f['seconds']:.1f} s after the command{topic}")
    else:
        print(f"  NOT DONE: {f['active']} of {n} devices active within the time limit")
    print(f"  hub server: {f['hub_written'] / mb:.0f} MB written (devices downloaded {f['downloaded'] / mb:.0f} MB), "
          f"{f['hub_cpu_s']:.1f} CPU s, {f['hub_rss'] / 2**20:.0f} MiB RSS at the end")
    if f.get("controller_cpu_s") is not None:
        print(f"  rollout controller (`hub control`): {f['controller_cpu_s']:.1f} CPU s")
    m = f["machine"]
    print(f"  the machine in that window (2 cores, every process): user {m['user']:.0f} s, system {m['system']:.0f} s, "
          f"iowait {m['iowait']:.0f} s, idle {m['idle']:.0f} s; {f.get('disk_written', 0) / mb:.0f} MB written to disk")
    rates = ", ".join(f"{k} {f[k]:.0f}/s" for k in ("publish/messages/sent", "messages/received",
                                                      "messages/sent") if k in f)
    rates = (f"devices' PUBLISHes {f['device_publishes']:.0f}/s (seen by the bench's subscriber); "
             f"$SYS: {rates or 'none across a restart (its counters start again)'}")
    print(f"  broker: {rates}; "
          f"{f['update_messages']} update reports seen; mosquitto {f['broker_rss'] / 2**20:.0f} MiB RSS at the end")
    print(f"  agents: {f['rss_per_device'] / 2**20:.1f} MiB RSS per device ({f['rss_added_per_device'] / 2**20:.1f} "
          f"MiB above a worker's {f['rss_base'] / 2**20:.0f} MiB after imports); workers used {f['worker_cpu_s']:.0f} "
          f"CPU s in all; device state on disk {f['disk_used'] / 1e9:.1f} GB "
          f"({'kept: --keep' if f.get('kept') else 'deleted after the run'})")
    if f.get("restarted_at_s") is not None:
        print(f"  broker restarted {f['restarted_at_s']:.1f} s into the rollout; {f['disconnects']} disconnects")
    if f.get("finished_s") is not None:
        print(f"  the controller marked the rollout {f['rollout_state']} {f['finished_s']:.1f} s after the command"
              f"{': ' + f['rollout_reason'] if f.get('rollout_reason') else ''}")
    if "abort" in f:
        a = f["abort"]

        def step(k: int | None) -> str:
            return "none" if k is None else f"{k + 1} ({a['steps'][k]['percent']:g} %)"

        print(f"  {a.get('state')} at step {step(a.get('stopped_at_step'))}; the first step past the threshold: "
              f"{step(a.get('first_step_past_threshold'))}")
        for k, st in enumerate(a.get("steps", [])):
            print(f"    step {k + 1} ({st['percent']:g} %): {st['devices']} devices, {st['failing']} told to fail")
        print(f"    the controller's counts at the end: {a.get('counts')}")
        print(f"  {a.get('moved')} devices had moved; not back on {BASE}: {a.get('moved_not_back') or 'none'}; "
              f"all back {f['seconds']:.1f} s after the command" if f["seconds"] is not None else "  NOT all back")
    problems = {k: f[k] for k in ("stuck", "not_active", "report_gaps") if f[k]}
    if f["dropped_inbound"]:
        problems["dropped_inbound"] = f["dropped_inbound"]
    if "abort" in f:
        a = f["abort"]
        # The controller judges the share as reports arrive: it may stop at a step whose final share
        # stays under the threshold (the failures came first), never later than the first step past
        # it, and never at a step without a failing device.
        stopped, first = a.get("stopped_at_step"), a.get("first_step_past_threshold")
        if a.get("state") != "aborted" or stopped is None or (first is not None and stopped > first) or \
                not a["steps"][stopped]["failing"]:
            problems["abort"] = "not aborted at the first step past the threshold"
        if a.get("moved_not_back"):
            problems["moved_not_back"] = a["moved_not_back"]
    if f["seconds"] is None:
        problems["time"] = "not done within --timeout-s"
    ok = "every device active, no job or report pending, no update report missing"
    print(f"  check: {problems or ok}")
    return not problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--size-mb", type=int, default=20)
    parser.add_argument("--per-worker", type=int, default=250, help="devices per worker process")
    parser.add_argument("--threads", type=int, default=32, help="default thread pool of each worker")
    parser.add_argument("--fault", choices=["none", "broker-restart", "probe"], default="none")
    parser.add_argument("--outage-s", type=float, default=3.0)
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per phase (start-up, rollout)")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--keep", action="store_true", help="keep the state directories")
    parser.add_argument("--sys-wait-s", type=float, default=2.5,
                        help="seconds of broker $SYS samples before and after the rollout (0: no $SYS rates, "
                             "for checks that read none)")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # mosquitto, the hub and the workers inherit it
    failed = 0
    for n in args.devices:
        figures = run_size(n, args)
        figures["size_mb"] = args.size_mb
        figures["kept"] = args.keep
        failed += not report(figures)
        if os.environ.get("FLEET_BENCH_JSON"):
            with open(os.environ["FLEET_BENCH_JSON"], "a") as out:
                out.write(json.dumps(figures) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
