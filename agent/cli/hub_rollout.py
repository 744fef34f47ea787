"""`edgefleet hub rollout …` and `edgefleet hub control`: staged rollouts from the command line.

    rollout start    --group G (BUNDLE_DIR | --version NAME=VERSION) --steps 1,10,50,100 --wait 10m
                     --max-failure-ratio 0.1 --min-devices 5 [--report-deadline 30m]
    rollout status   [ID] [--json]
    rollout pause | resume | abort ID
    control          the controller that advances and aborts rollouts (long-running)

`start` signs step 1 and rings the group's doorbell; the controller does the rest.
`abort` signs the pin back to the previous version at once. The logic lives in
sync/hub/rollouts/; this module parses, prints and maps errors to one line + exit code.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sync.errors import HubError, SyncError
from sync.hub.rollouts.record import OUTCOMES, Plan, RolloutRecord
from sync.hub.rollouts.store import RolloutStore

if TYPE_CHECKING:  # paho and python-tuf load when a rollout command runs, not when the parser is built
    from sync.hub.mqtt_tools import Broker
    from sync.hub.publish import PublishResult
    from sync.hub.repository import HubRepository

DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
#: a controller that has not written its counters for this long is probably not running
CONTROLLER_STALE_S = 60.0


def duration(text: str) -> float:
    """'30s', '10m', '1h', '1.5h', '90' (seconds) -> seconds; argparse turns the error into exit 2."""
    match = DURATION_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use e.g. 30s, 10m, 1h")
    return float(match.group(1)) * UNITS[match.group(2)]


def percentages(text: str) -> list[float]:
    try:
        return [float(part.strip().rstrip("%")) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give percentages separated by commas, e.g. 1,10,50,100") \
            from None


def ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 0.1 for 10 %)") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 0 and below 1 (e.g. 0.1 for 10 %)")
    return value


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def add_rollout_commands(sub: Any, add_hub_dir: Any, add_mqtt_args: Any) -> None:
    rollout = sub.add_parser("rollout", help="staged rollouts: a share of a group at a time, aborted on failures")
    actions_ = rollout.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")

    start = actions_.add_parser("start", help="sign step 1 of a new rollout and ring the group's doorbell")
    add_hub_dir(start)
    start.add_argument("--group", required=True, help="the group to move")
    start.add_argument("bundle", nargs="?", metavar="[NAME=]BUNDLE_DIR", help="the new release's bundle directory")
    start.add_argument("--version", metavar="NAME=VERSION", help="an already published version instead of a bundle")
    start.add_argument("--steps", type=percentages, default=[1.0, 10.0, 50.0, 100.0], metavar="P,P,…",
                       help="cumulative shares of the group in percent, ending at 100 (default 1,10,50,100)")
    start.add_argument("--wait", type=duration, default=600.0, metavar="DURATION",
                       help="least time a step runs before the next (default 10m; 30s, 10m, 1h)")
    start.add_argument("--max-failure-ratio", type=ratio, default=0.1, metavar="R",
                       help="abort when failed / (succeeded + failed) exceeds R (default 0.1)")
    start.add_argument("--min-devices", type=count, default=5, metavar="N",
                       help="…once at least N devices are done (default 5)")
    start.add_argument("--report-deadline", type=duration, default=1800.0, metavar="DURATION",
                       help="a device not on the new version this long after its step started counts as "
                            "failed (default 30m)")
    add_mqtt_args(start)
    start.add_argument("--no-doorbell", action="store_true", help="sign only; do not ring the doorbell")

    status = actions_.add_parser("status", help="rollouts, or one rollout's steps, counts and failing devices")
    add_hub_dir(status)
    status.add_argument("id", nargs="?", help="the rollout (default: every rollout)")
    status.add_argument("--json", action="store_true")

    for name, text in (("pause", "hold at the current step (the abort rule still applies)"),
                       ("resume", "go on; the current step's wait and deadline start again"),
                       ("abort", "sign a pin back to the previous version now")):
        action = actions_.add_parser(name, help=text)
        add_hub_dir(action)
        action.add_argument("id")
        add_mqtt_args(action)  # the doorbell (abort) and the rollout's topic

    control = sub.add_parser("control", help="run the rollout controller (reads MQTT, advances and aborts)")
    add_hub_dir(control)
    add_mqtt_args(control)
    control.add_argument("--interval", type=duration, default=2.0, metavar="DURATION",
                         help="evaluate running rollouts at least this often (default 2s)")


def run_rollout(args: argparse.Namespace, broker: Any, error: Any) -> int:
    """`broker(args)` -> Broker; `error(message, code)` -> the CLI's exception."""
    from sync.hub.repository import HubRepository
    from sync.hub.rollouts import actions

    repo = HubRepository(args.dir)
    store = RolloutStore(args.dir)
    repo.settings  # noqa: B018 - refuses a directory that is not a hub
    command = args.rollout_command
    if command == "start":
        return _start(args, repo, store, broker, error)
    if command == "status":
        return _status(args, store)
    if command == "pause":
        record = actions.pause(store, args.id, time.time())
        print(f"rollout {record.id} paused at step {record.step + 1} ({record.percent:g} %); "
              f"resume it with `edgefleet hub rollout resume {record.id}`")
        _announce(args, broker(args), record)
        return 0
    if command == "resume":
        record = actions.resume(store, args.id, time.time())
        print(f"rollout {record.id} running again at step {record.step + 1} ({record.percent:g} %)")
        _announce(args, broker(args), record)
        return 0
    if command == "abort":
        record, result = actions.abort(repo, store, args.id, time.time())
        if result is None:
            print(f"rollout {record.id} aborted (the signed state no longer carried it)")
            _announce(args, broker(args), record)
            return 0
        print(f"rollout {record.id} aborted: group {record.group} pinned to {record.model} {record.from_version} "
              f"(serial {result.serial}); every device that moved goes back")
        _ring(args, broker(args), result)
        _announce(args, broker(args), record)
        return 0
    raise error(f"unknown rollout command {command}", 2)


def run_control(args: argparse.Namespace, broker: Broker) -> int:
    from agent.lifecycle.logs import setup_logging
    from sync.hub.controller import run_controller
    from sync.hub.repository import HubRepository

    setup_logging("info")
    run_controller(HubRepository(args.dir), broker, args.topic_prefix, args.interval)
    return 0


def _start(args: argparse.Namespace, repo: HubRepository, store: RolloutStore, broker: Any, error: Any) -> int:
    from sync.hub.publish import BundleSource, rollout_target
    from sync.hub.rollouts import actions

    if bool(args.bundle) == bool(args.version):
        raise error("rollout start: give the new release as BUNDLE_DIR or as --version NAME=VERSION (one of them)",
                    2)
    plan = Plan(args.steps, args.wait, args.max_failure_ratio, args.min_devices, args.report_deadline)
    try:
        plan.check()
    except HubError as exc:
        raise error(str(exc), 2) from None
    if args.bundle:
        name, sep, path = args.bundle.partition("=")
        target = rollout_target(repo, BundleSource(Path(path), name) if sep else BundleSource(Path(args.bundle)))
    else:
        name, sep, version = args.version.partition("=")
        if not sep or not name or not version:
            raise error(f"--version: expected NAME=VERSION, got {args.version!r}", 2)
        target = rollout_target(repo, name=name, version=version)
    record, result = actions.start(repo, store, args.group, target, plan, time.time())
    steps = ",".join(f"{s:g}" for s in plan.steps)
    print(f"rollout {record.id} started: group {record.group}, {record.model} {record.from_version} -> "
          f"{record.to_version}, steps {steps} %, step 1 signed (serial {result.serial})")
    if not args.no_doorbell:
        _ring(args, broker(args), result)
        _announce(args, broker(args), record)
    controller = store.controller()
    if controller is None or time.time() - float(controller.get("at", 0)) > CONTROLLER_STALE_S:
        print("note: no rollout controller has reported in the last minute: it advances and aborts the rollout; "
              f"run `edgefleet hub control --hub {args.dir}` (or its systemd unit)")
    print(f"watch it: edgefleet hub rollout status {record.id} --hub {args.dir}")
    return 0


def _ring(args: argparse.Namespace, broker: Broker, result: PublishResult) -> None:
    from sync.hub.mqtt_tools import ring_doorbell

    topic = result.doorbell_topic(args.topic_prefix)
    try:
        ring_doorbell(broker, topic, result.doorbell)
        print(f"doorbell rung on {topic}")
    except SyncError as exc:
        print(f"doorbell not rung ({exc}); devices find it at their next periodic check")


def _announce(args: argparse.Namespace, broker: Broker, record: RolloutRecord) -> None:
    """The rollout's status, retained on its topic (sync/hub/rollouts/topic.py); a broker that
    is away delays it to the controller's next look, it changes nothing signed."""
    from sync.hub.rollouts.topic import publish_rollout

    try:
        topic = publish_rollout(broker, args.topic_prefix, record)
        print(f"status published on {topic}")
    except SyncError as exc:
        print(f"rollout status not published on MQTT ({exc}); the rollout controller publishes it when it runs")


def _status(args: argparse.Namespace, store: RolloutStore) -> int:
    records = [store.load(args.id)] if args.id else store.all()
    controller = store.controller()
    if args.json:
        rows = [_json(r) for r in records]
        body = rows[0] | {"controller": controller} if args.id else {"rollouts": rows, "controller": controller}
        print(json.dumps(body, indent=2, sort_keys=True))
        return 0
    if not records:
        print("no rollouts")
    elif not args.id:
        print(f"{'ID':10} {'GROUP':12} {'MODEL':22} {'FROM -> TO':20} {'STATE':10} STEP")
        for r in records:
            print(f"{r.id:10} {r.group:12} {r.model:22} {r.from_version + ' -> ' + r.to_version:20} {r.state:10} "
                  f"{r.step + 1}/{len(r.plan.steps)} ({r.percent:g} %)")
    else:
        _print_one(records[0])
    if controller is not None:
        age = time.time() - float(controller.get("at", 0))
        ignored = controller.get("ignored") or {}
        print(f"controller: {'connected' if controller.get('connected') else 'not connected'} to "
              f"{controller.get('broker')}, {controller.get('devices')} device(s) seen, last update {age:.0f}s ago"
              + (f"; ignored messages: {', '.join(f'{k} {v}' for k, v in sorted(ignored.items()))}"
                 if ignored else ""))
    else:
        print("controller: never ran for this hub (`edgefleet hub control`)")
    return 0


def _json(record: RolloutRecord) -> dict[str, Any]:
    return record.status_body()


def _print_one(r: RolloutRecord) -> None:
    print(f"rollout {r.id}: group {r.group}, {r.model} {r.from_version} -> {r.to_version}: {r.state}")
    marks = []
    for i, pct in enumerate(r.plan.steps):
        mark = "*" if i == r.step and not r.done else ("done" if i < r.step or r.state == "completed" else "")
        marks.append(f"{pct:g}%" + (f" [{mark}]" if mark else ""))
    print(f"  steps: {'  '.join(marks)}   (wait {r.plan.wait_s:g}s, abort above {r.plan.max_failure_ratio:g} "
          f"failed once {r.plan.min_devices} done, report deadline {r.plan.report_deadline_s:g}s)")
    if not r.done:
        print(f"  step {r.step + 1} started {time.time() - r.step_started_at:.0f}s ago")
    counts = ", ".join(f"{o} {r.counts.get(o, 0)}" for o in OUTCOMES)
    print(f"  devices in step: {r.counts.get('in_step', 0)}: {counts}")
    if r.reason:
        print(f"  why it stopped: {r.reason}" if r.done else f"  {r.reason}")
    elif r.note and not r.done:
        print(f"  now: {r.decision}: {r.note}")
    failing = {d: o for d, o in r.devices.items() if o.get("outcome") in ("failed", "no-report", "unexpected")}
    for device, outcome in sorted(failing.items()):
        print(f"  {device}: {outcome['outcome']} {outcome.get('code') or ''}"
              + (f" ({outcome['message']})" if outcome.get("message") else ""))
