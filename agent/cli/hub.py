"""`edgefleet hub …`: the fleet operator's commands (the hub's code lives in sync/hub/).

    init             new repository and keys (thresholds configurable)
    publish BUNDLE…  bundles -> signed targets, desired state for a group or device, doorbell
    serve            the repository over HTTP with Range (one machine; any static server will do)
    refresh          re-sign what is about to expire (run it from a timer)
    rotate-key ROLE  new keys for a role; the new root is signed by old and new root keys
    status           per device: desired vs active per model, and what is wrong (offline, behind,
                     failing, refused, unreachable, disabled, unexpected)
    rollout …        staged rollouts: start, status, pause, resume, abort (agent/cli/hub_rollout.py)
    control          the rollout controller, long-running (sync/hub/controller.py)
    view             the fleet view web page, read-only, live, from MQTT alone (sync/hub/view/)
    webhooks         fleet events posted to URLs, signed, long-running (sync/hub/webhooks/)

Every command works on one hub directory: --hub DIR, else $EDGEFLEET_HUB, else ./hub; `status`
works without one too (then "desired" is what each device reports it was told).

Errors are one line on stderr and a non-zero exit, as for the agent's own commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from security.desired import Scope
from security.errors import SecurityError
from security.keys import ROLES
from sync.errors import SyncError

if TYPE_CHECKING:  # the hub's tools (paho, python-tuf) load when a hub command runs, not with the parser
    from sync.hub.mqtt_tools import Broker
    from sync.hub.repository import HubRepository

MQTT_ENV = "EDGEFLEET_HUB_MQTT"
HUB_ENV = "EDGEFLEET_HUB"
DEFAULT_PREFIX = "edgefleet/v1"


class HubCliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def add_hub_commands(commands: Any) -> None:
    hub = commands.add_parser("hub", help="the fleet operator's hub: keys, signed releases, rollout status")
    sub = hub.add_subparsers(dest="hub_command", required=True, metavar="ACTION")

    init = sub.add_parser("init", help="create a hub repository and its keys")
    add_hub_dir(init)
    for role in ROLES:
        init.add_argument(f"--{role}-keys", type=int, default=1, metavar="N", help=f"keys for {role} (default 1)")
        init.add_argument(f"--{role}-threshold", type=int, default=1, metavar="N",
                          help=f"signatures {role} metadata needs (default 1)")
    init.add_argument("--expiry", action="append", default=[], metavar="ROLE=DAYS",
                      help="how long a role's metadata stays valid (defaults: root 365, targets 90, snapshot 7, "
                           "timestamp 1)")

    pub = sub.add_parser("publish", help="sign bundles and make them what a group or device runs")
    add_hub_dir(pub)
    target = pub.add_mutually_exclusive_group(required=True)
    target.add_argument("--group", help="the group whose desired state changes")
    target.add_argument("--device", help="the device whose own desired state changes")
    pub.add_argument("bundles", nargs="*", metavar="[NAME=]BUNDLE_DIR",
                     help="bundle directories (model.toml + files); NAME defaults to the directory's model name")
    pub.add_argument("--pin", action="append", default=[], metavar="NAME=VERSION",
                     help="run an already published version (a fleet-wide rollback)")
    pub.add_argument("--remove", action="append", default=[], metavar="NAME", help="drop a model from the state")
    add_mqtt_args(pub)
    pub.add_argument("--no-doorbell", action="store_true",
                     help="sign only; connected agents take it at their next reconnect, restart or check-now")

    serve = sub.add_parser("serve", help="serve the repository over HTTP (Range requests supported)")
    add_hub_dir(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)

    refresh = sub.add_parser("refresh", help="re-sign metadata that is about to expire")
    add_hub_dir(refresh)
    refresh.add_argument("--force", action="store_true", help="re-sign every role now")

    rotate = sub.add_parser("rotate-key", help="replace a role's keys (root rotation signed by old and new keys)")
    add_hub_dir(rotate)
    rotate.add_argument("role", choices=ROLES)
    rotate.add_argument("--revoke", action="append", metavar="KEYID",
                        help="key ids (or prefixes) to revoke (default: every current key of the role)")
    rotate.add_argument("--count", type=int, help="new keys to add (default: as many as are revoked)")

    status = sub.add_parser("status", help="per device: desired vs active versions, and what is wrong")
    add_mqtt_args(status)
    status.add_argument("--hub", dest="dir", type=Path, default=None,
                        help=f"the hub directory: desired versions from its signed states (default ${HUB_ENV}, "
                             "else ./hub if it is a hub, else what devices report)")
    status.add_argument("--wait", type=float, default=1.0, help="seconds to collect retained messages")
    status.add_argument("--json", action="store_true")
    status.add_argument("--follow", type=float, metavar="SECONDS",
                        help="then print update transitions as they arrive, for SECONDS (0: until interrupted)")
    status.add_argument("--until", metavar="STATE", help="with --follow: stop at the first transition into STATE "
                        "(e.g. active); exit 1 if none came")

    view = sub.add_parser("view", help="serve the fleet view web page (read-only, live, built from MQTT)")
    add_mqtt_args(view)
    view.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    view.add_argument("--port", type=int, default=8090, help="port to listen on (default 8090)")
    view.add_argument("--history", type=Path, metavar="FILE",
                      help="SQLite file for the device charts' history (default: in memory, lost at exit)")

    from agent.cli.hub_rollout import add_rollout_commands

    add_rollout_commands(sub, add_hub_dir, add_mqtt_args)

    from agent.cli.hub_webhooks import add_webhooks_command

    add_webhooks_command(sub, add_hub_dir, add_mqtt_args)

    from agent.cli.audit import add_audit_arguments

    audit = sub.add_parser("audit", help="a device's forwarded audit log (agent/cli/audit.py)")
    audit_verify = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION").add_parser(
        "verify", help="check a device's forwarded records (a capture of {prefix}/devices/ID/audit)")
    audit_verify.add_argument("--device", required=True, help="the device id (its key: from its birth message)")
    audit_verify.add_argument("file", metavar="FILE", help="the captured records, one payload a line")
    audit_verify.add_argument("--wait", type=float, default=1.0, help="seconds to wait for the retained state")
    add_mqtt_args(audit_verify)
    add_audit_arguments(audit_verify)


def add_hub_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hub", dest="dir", type=Path, default=Path(os.environ.get(HUB_ENV, "hub")),
                        help=f"the hub directory (default ${HUB_ENV}, else ./hub)")


def add_mqtt_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mqtt", metavar="HOST[:PORT]",
                        help=f"the fleet's broker (default ${MQTT_ENV}, else 127.0.0.1:1883; 8883 with TLS)")
    parser.add_argument("--topic-prefix", default=DEFAULT_PREFIX)
    tls = parser.add_argument_group("broker TLS and credentials (docs/security.md#per-device-identity-on-the-broker)")
    tls.add_argument("--mqtt-tls", action="store_true", default=None,
                     help=f"TLS, checked against the system's trust store (${MQTT_ENV}_TLS=1); on by itself "
                          "with --mqtt-ca or --mqtt-cert")
    tls.add_argument("--mqtt-ca", metavar="FILE", help=f"CA that signed the broker's certificate (${MQTT_ENV}_CA)")
    tls.add_argument("--mqtt-cert", metavar="FILE", help=f"the hub's client certificate (${MQTT_ENV}_CERT)")
    tls.add_argument("--mqtt-key", metavar="FILE", help=f"its private key (${MQTT_ENV}_KEY)")
    tls.add_argument("--mqtt-username", metavar="NAME", help=f"user name (${MQTT_ENV}_USERNAME)")
    tls.add_argument("--mqtt-password-file", metavar="FILE",
                     help=f"a file holding the password, first line (or the password in ${MQTT_ENV}_PASSWORD)")


def _broker(args: argparse.Namespace) -> Broker:
    from sync.hub.mqtt_tools import Broker

    env = os.environ

    def option(name: str) -> str | None:
        value = getattr(args, f"mqtt_{name}", None)
        return value if value is not None else env.get(f"{MQTT_ENV}_{name.upper()}") or None

    password = env.get(f"{MQTT_ENV}_PASSWORD") or None
    password_file = getattr(args, "mqtt_password_file", None)
    if password_file is not None:
        try:
            password = Path(password_file).read_text(encoding="utf-8").splitlines()[0]
        except (OSError, IndexError) as exc:
            raise HubCliError(f"--mqtt-password-file {password_file}: cannot read a password "
                              f"({getattr(exc, 'strerror', None) or 'empty file'})", code=2) from None
    tls = bool(getattr(args, "mqtt_tls", None) or env.get(f"{MQTT_ENV}_TLS", "") not in ("", "0", "false"))
    try:
        broker = Broker.parse(args.mqtt or env.get(MQTT_ENV) or "127.0.0.1")
        broker = dataclasses.replace(broker, tls=tls, ca_file=option("ca"), cert_file=option("cert"),
                                     key_file=option("key"), username=option("username"), password=password)
    except ValueError as exc:
        raise HubCliError(str(exc), code=2) from None
    if broker.tls and ":" not in (args.mqtt or env.get(MQTT_ENV) or ""):
        broker = dataclasses.replace(broker, port=8883)
    return broker


def _pairs(values: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key or not val:
            raise HubCliError(f"{what}: expected KEY=VALUE, got {value!r}", code=2)
        pairs[key] = val
    return pairs


def _found_when(prefix: str) -> str:
    """When agents find a release nobody rang the doorbell for: at their timer check, or
    sooner when something makes them look."""
    return (
        "agents connected to MQTT take this release at their next timer check (updates.check_interval_s, "
        "30 min by default), when they next reconnect to the broker or restart, "
        f'or at once when asked: publish {{"command": "check-now"}} to {prefix}/devices/<id>/cmd '
        "(`edgefleet models fetch` on a device downloads it ahead); agents not connected to MQTT look every "
        "updates.poll_interval_s"
    )


def run_hub(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (SecurityError, SyncError) as exc:
        raise HubCliError(str(exc)) from None


def _run(args: argparse.Namespace) -> int:
    from sync.hub.mqtt_tools import follow_updates, ring_doorbell
    from sync.hub.publish import BundleSource, publish
    from sync.hub.repository import HubRepository, HubSettings

    command = args.hub_command
    if command == "init":
        settings = HubSettings()
        for role, days in _pairs(args.expiry, "--expiry").items():
            if role not in settings.expiry_days:
                raise HubCliError(f"--expiry: unknown role {role!r}", code=2)
            try:
                settings.expiry_days[role] = float(days)
            except ValueError:
                raise HubCliError(f"--expiry {role}: {days!r} is not a number of days", code=2) from None
        counts = {r: getattr(args, f"{r}_keys") for r in ROLES}
        thresholds = {r: getattr(args, f"{r}_threshold") for r in ROLES}
        repo = HubRepository.create(args.dir, counts, thresholds, settings)
        print(f"hub created in {args.dir}")
        print(f"  keys: {repo.keys.directory} (0600; move the root keys offline when not rotating)")
        print(f"  trust root for devices: {args.dir / 'trust-root.json'} -> /etc/edgefleet/root.json")
        print(f"  serve it: edgefleet hub serve --hub {args.dir}")
        return 0
    if command == "publish":
        repo = HubRepository(args.dir)
        bundles = []
        for spec in args.bundles:
            name, sep, path = spec.partition("=")
            bundles.append(BundleSource(Path(path), name) if sep else BundleSource(Path(spec)))
        scope: Scope = "group" if args.group else "device"
        target = args.group or args.device
        if not bundles and not args.pin and not args.remove:
            raise HubCliError("nothing to publish: give bundle directories, --pin or --remove", code=2)
        result = publish(repo, scope, target, bundles, _pairs(args.pin, "--pin"), args.remove)
        models = ", ".join(f"{n}={v}" for n, v in sorted(result.models.items()))
        print(f"published {scope} {target} serial {result.serial} (targets v{result.targets_version}): {models}")
        if args.no_doorbell:
            print(f"doorbell not rung (--no-doorbell); {_found_when(args.topic_prefix)}")
            return 0
        topic = result.doorbell_topic(args.topic_prefix)
        broker = _broker(args)
        try:
            ring_doorbell(broker, topic, result.doorbell)
            print(f"doorbell rung on {topic}")
        except SyncError as exc:
            print(f"doorbell not rung ({exc}); {_found_when(args.topic_prefix)}")
        return 0
    if command == "serve":
        from sync.hub.server import serve_hub

        repo = HubRepository(args.dir)
        repo.settings  # noqa: B018 - refuses a directory that is not a hub
        from agent.http.server import bind_reason

        try:
            serve_hub(repo.dir / "repository", args.host, args.port,
                      announce=f"serving {repo.dir / 'repository'} on http://{args.host}:{args.port}/ (devices: "
                               f"[updates] hub_url = \"http://<this machine>:{args.port}\")")
        except OSError as exc:  # the bind, before anything is served
            raise HubCliError(f"cannot listen on {args.host}:{args.port}: {bind_reason(exc)} (stop what uses it, "
                              "or choose another --port / --host)") from None
        return 0
    if command == "refresh":
        done = HubRepository(args.dir).refresh(force=args.force)
        print(f"re-signed: {', '.join(done) or 'nothing needed'}")
        return 0
    if command == "rotate-key":
        repo = HubRepository(args.dir)
        revoke = None
        if args.revoke:
            current = repo.root().roles[args.role].keyids
            revoke = [k for prefix in args.revoke for k in current if k.startswith(prefix)]
            if len(revoke) != len(args.revoke):
                raise HubCliError(f"--revoke: not every key id given signs for {args.role}", code=2)
        added, revoked = repo.rotate_key(args.role, revoke, args.count)
        print(f"{args.role}: added {', '.join(k[:16] for k in added)}; revoked {', '.join(k[:16] for k in revoked)}")
        print(f"root is now v{repo.root().version}; devices follow the rotation at their next refresh")
        return 0
    if command == "status" and args.follow is not None:
        def emit(m: dict[str, Any]) -> None:
            code = f" ({m.get('code')}: {m.get('message')})" if m.get("code") else ""
            print(f"{m.get('device')}: {m.get('model') or '-'} {m.get('version') or ''} -> {m.get('state')}{code}",
                  flush=True)

        reached = follow_updates(_broker(args), args.topic_prefix, args.follow, args.until, emit)
        return 0 if reached or args.until is None else 1
    if command == "status":
        return _status(args)
    if command == "webhooks":
        from agent.cli.hub_webhooks import run_webhooks_command

        return run_webhooks_command(args, _broker(args), HubCliError)
    if command == "view":
        return _view(args)
    if command == "audit":
        from agent.cli import audit as audit_cli

        return audit_cli.run(audit_cli.hub_verify_command, args, _broker(args))
    if command in ("rollout", "control"):
        from agent.cli import hub_rollout

        if command == "control":
            return hub_rollout.run_control(args, _broker(args))
        return hub_rollout.run_rollout(args, _broker, HubCliError)
    raise HubCliError(f"unknown hub command {command}", code=2)


def _view(args: argparse.Namespace) -> int:
    from agent.http.server import bind_reason
    from sync.hub.view.server import ViewSettings, serve_view

    settings = ViewSettings(_broker(args), args.topic_prefix, args.history)
    try:
        serve_view(settings, args.host, args.port,
                   announce=f"fleet view on http://{args.host}:{args.port}/ (read-only; broker "
                            f"{settings.broker.host}:{settings.broker.port})")
    except OSError as exc:  # the bind, before anything is served
        raise HubCliError(f"cannot listen on {args.host}:{args.port}: {bind_reason(exc)} (stop what uses it, "
                          "or choose another --port / --host)") from None
    return 0


def _status(args: argparse.Namespace) -> int:
    from sync.hub.controller import collect_fleet
    from sync.hub.repository import HubRepository
    from sync.hub.rollouts.store import RolloutStore
    from sync.hub.status import device_rows

    hub_dir = args.dir or (Path(os.environ[HUB_ENV]) if os.environ.get(HUB_ENV) else None)
    if hub_dir is None and (Path("hub") / "hub.json").exists():
        hub_dir = Path("hub")
    fleet = collect_fleet(_broker(args), args.topic_prefix, args.wait)
    now = time.time()
    desired = presence = None
    if hub_dir is not None:
        desired = _hub_desired(HubRepository(hub_dir), fleet)
        presence = RolloutStore(hub_dir).presence()
    rows = device_rows(fleet, now, desired, presence)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no device has reported")
        return 0
    print(f"{'DEVICE':20} {'GROUP':12} {'ONLINE':6} {'LAST UPDATE':30} {'MODELS (desired -> active)':40} FLAGS")
    for row in rows:
        update = row["update"] or {}
        state = " ".join(str(x) for x in (update.get("state"), update.get("model"), update.get("version")) if x)
        if update.get("code"):
            state += f" ({update['code']})"
        online = {True: "yes", False: "no"}.get(row["online"], "?")
        models = []
        for name in sorted(set(row["models"]) | set(row["desired"])):
            want = (row["desired"].get(name) or {}).get("version")
            active = row["models"].get(name)
            models.append(f"{name}={active}" if want in (None, active) else f"{name}={want}->{active or '-'}")
        print(f"{row['device']:20} {row['group'] or '-':12} {online:6} {state or '-':30} {', '.join(models):40} "
              f"{_flags(row['flags'], now)}")
    return 0


def _hub_desired(repo: HubRepository, fleet: Any) -> Any:
    from security.desired import NAME_RE, desired_path
    from sync.hub.publish import current_desired
    from sync.hub.status import hub_desired

    published = repo.targets().targets  # once: only devices with a state of their own are read
    groups = {v.group for v in fleet.devices.values() if v.group}
    return hub_desired({g: current_desired(repo, "group", g) for g in groups},
                       {d: current_desired(repo, "device", d) for d in fleet.devices
                        if NAME_RE.match(d) and desired_path("device", d) in published})


def _flags(flags: dict[str, Any], now: float) -> str:
    words = []
    for name, value in flags.items():
        if name == "offline":
            ago = value.get("for_s")
            if ago is None and value.get("last_heard_device_clock"):
                ago = now - value["last_heard_device_clock"]
            words.append(f"offline {_ago(ago)}" if ago is not None else "offline")
        elif name == "unreachable":
            words.append(f"unreachable since {_ago(now - value['since'])}" if value.get("since") else "unreachable")
        elif name in ("failing", "unexpected"):
            words.append(f"{name} " + ",".join(f"{v['model']}" + (f" ({v.get('code')})" if v.get("code") else "")
                                                 for v in value))
        elif name == "refused":
            words.append(f"refused ({value.get('code')})")
        elif name == "behind":
            words.append("behind " + ",".join(value))
        else:
            words.append(name)
    return "; ".join(words) or "ok"


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"
