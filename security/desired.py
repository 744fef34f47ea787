"""Desired states and doorbells: what a device should run, and the hint that it changed.

A *desired state* is a small JSON target of the TUF repository
(``desired/groups/<group>.json``, ``desired/devices/<id>.json``), so by the time
it reaches `parse_desired` its bytes have been verified against signed
metadata. What is checked here is policy a signature cannot express:

- it is for this device's group or this device (a correctly signed state for
  another group is refused: a mirror must not be able to swap files around);
- every model name, version and file name is a plain path component, and every
  file is the target ``models/<name>/<version>/<file>`` of exactly the version it
  is listed under (no ``..``, no absolute paths, no file of another release);
- its serial never goes down.

A group's entry for a model may carry a *rollout*: a second version, the share of
the group that runs it and a salt. Each device works out from its own id whether
it is in that share (`in_rollout`), so one signed file moves a step of a staged
rollout for a fleet of any size, and a device's membership only grows with the
share (the same salt and id always give the same bucket).

A *doorbell* is what MQTT carries: a hint to refresh, never trusted. Its fields
are read only to decide whether to look, and to say afterwards that what it
announced was not what the hub signed.

Pure functions over bytes; no files, no network.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import DesiredStateRefused, OtherReleaseRefused, OtherTargetRefused, UnsafePathRefused

SCHEMA = "edgefleet.desired/1"
DOORBELL_SCHEMA = "edgefleet.doorbell/1"
#: Model names, versions, groups and device ids: one safe path component.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
MAX_DESIRED_BYTES = 1 << 20

Scope = Literal["group", "device"]
#: Where a device's desired version of a model came from (reported in edgefleet.reported/1).
Origin = Literal["group", "device", "pin", "rollout"]
SALT_RE = re.compile(r"^[0-9a-f]{8,64}$")


def desired_path(scope: Scope, target: str) -> str:
    """The target path of the desired state for a group or a device."""
    check_name(target, f"{scope} name")
    return f"desired/{'groups' if scope == 'group' else 'devices'}/{target}.json"


def model_file_path(name: str, version: str, file: str) -> str:
    """The target path of one file of one model version."""
    return f"models/{name}/{version}/{file}"


def check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value) or value in (".", ".."):
        raise UnsafePathRefused(f"{what} {value!r} is not a plain name (letters, digits, '.', '_', '-')")
    return value


@dataclass(frozen=True)
class Rollout:
    """A staged rollout of one model in a group: `version` for the devices whose bucket
    (`bucket(salt, device_id)`, in [0, 100)) is below `percent`; the entry's own version
    for the others."""

    id: str
    version: str
    files: Mapping[str, str]
    percent: float
    salt: str
    #: the state serial the rollout started at; the same for every step, so a device that
    #: denied the version is not asked again by the next step
    serial: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "version": self.version, "files": dict(sorted(self.files.items())),
                "percent": self.percent, "salt": self.salt, "serial": self.serial}


@dataclass(frozen=True)
class DesiredModel:
    name: str
    version: str
    #: file name in the bundle -> target path in the repository
    files: Mapping[str, str]
    #: the desired-state serial at which this entry was last published: a version denied on a
    #: device is tried again only when its entry is published anew
    serial: int = 0
    #: "pin" for a version published with --pin (a rollback, a rollout's abort); else the scope
    origin: Origin = "group"
    #: a staged rollout of this model (group entries only)
    rollout: Rollout | None = None


def bucket(salt: str, device_id: str) -> float:
    """A device's place in [0, 100) for a rollout's salt: uniform over devices, fixed per pair."""
    digest = hashlib.sha256(f"{salt}/{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def in_rollout(rollout: Rollout, device_id: str) -> bool:
    return rollout.percent >= 100 or bucket(rollout.salt, device_id) < rollout.percent


@dataclass(frozen=True)
class DesiredState:
    scope: Scope
    target: str
    serial: int
    models: Mapping[str, DesiredModel] = field(default_factory=dict)
    issued_at: str = ""

    def to_json(self) -> bytes:
        body = {
            "schema": SCHEMA,
            "scope": self.scope,
            "target": self.target,
            "serial": self.serial,
            "issued_at": self.issued_at,
            "models": {
                m.name: _entry_json(m, self.serial) for m in sorted(self.models.values(), key=lambda m: m.name)
            },
        }
        return json.dumps(body, indent=1, sort_keys=True).encode()


def _entry_json(model: DesiredModel, state_serial: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"version": model.version, "files": dict(sorted(model.files.items())),
                             "serial": model.serial or state_serial}
    if model.origin == "pin":
        entry["pin"] = True
    if model.rollout is not None:
        entry["rollout"] = model.rollout.to_json()
    return entry


def parse_desired(data: bytes, scope: Scope, target: str) -> DesiredState:
    """Check a verified desired-state target for this `scope`/`target`; raise a refusal."""
    if len(data) > MAX_DESIRED_BYTES:
        raise DesiredStateRefused(f"desired state of {len(data)} bytes; at most {MAX_DESIRED_BYTES}")
    try:
        body = json.loads(data)
    except ValueError as exc:
        raise DesiredStateRefused(f"desired state is not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("schema") != SCHEMA:
        raise DesiredStateRefused(f"desired state is not {SCHEMA}")
    if body.get("scope") != scope or body.get("target") != target:
        raise OtherTargetRefused(
            f"desired state is for {body.get('scope')} {body.get('target')!r}, not {scope} {target!r}"
        )
    serial = body.get("serial")
    if not isinstance(serial, int) or isinstance(serial, bool) or serial < 1:
        raise DesiredStateRefused(f"desired state serial must be a positive integer, got {serial!r}")
    raw_models = body.get("models")
    if not isinstance(raw_models, dict):
        raise DesiredStateRefused("desired state has no 'models' object")
    models = {}
    for name, entry in raw_models.items():
        models[check_name(name, "model name")] = _parse_model(name, entry, serial, scope)
    return DesiredState(scope, target, serial, models, str(body.get("issued_at", "")))


def _parse_model(name: str, entry: Any, state_serial: int, scope: Scope = "group") -> DesiredModel:
    if not isinstance(entry, dict):
        raise DesiredStateRefused(f"model {name}: expected an object")
    version = check_name(entry.get("version"), f"model {name} version")
    files = _parse_files(name, version, entry.get("files"))
    serial = _parse_serial(name, entry.get("serial", state_serial), state_serial)
    pin = entry.get("pin", False)
    if not isinstance(pin, bool):
        raise DesiredStateRefused(f"model {name}: 'pin' must be true or false")
    rollout = None
    if entry.get("rollout") is not None:
        if scope != "group":
            raise DesiredStateRefused(f"model {name}: a rollout belongs to a group's desired state")
        rollout = _parse_rollout(name, entry["rollout"], state_serial)
    origin: Origin = "pin" if pin else scope
    return DesiredModel(name, version, files, serial, origin, rollout)


def _parse_rollout(name: str, body: Any, state_serial: int) -> Rollout:
    if not isinstance(body, dict):
        raise DesiredStateRefused(f"model {name}: 'rollout' must be an object")
    rollout_id = check_name(body.get("id"), f"model {name} rollout id")
    version = check_name(body.get("version"), f"model {name} rollout version")
    files = _parse_files(name, version, body.get("files"))
    percent = body.get("percent")
    if (not isinstance(percent, int | float) or isinstance(percent, bool) or not math.isfinite(percent)
            or not 0 < percent <= 100):
        raise DesiredStateRefused(f"model {name} rollout {rollout_id}: percent must be above 0 and at most 100")
    salt = body.get("salt")
    if not isinstance(salt, str) or not SALT_RE.match(salt):
        raise DesiredStateRefused(f"model {name} rollout {rollout_id}: salt must be 8-64 lowercase hex digits")
    serial = _parse_serial(name, body.get("serial", state_serial), state_serial)
    return Rollout(rollout_id, version, files, float(percent), salt, serial)


def _parse_files(name: str, version: str, files: Any) -> dict[str, str]:
    if not isinstance(files, dict) or "model.toml" not in files:
        raise DesiredStateRefused(f"model {name} {version}: 'files' must list model.toml and the model's files")
    checked = {}
    for file, path in files.items():
        if not isinstance(file, str) or not FILE_RE.match(file):
            raise UnsafePathRefused(f"model {name} {version}: file name {file!r} is not one plain path component")
        if not isinstance(path, str) or _unsafe(path):
            raise UnsafePathRefused(f"model {name} {version}: target path {path!r} could leave its directory")
        if path != model_file_path(name, version, file):
            raise OtherReleaseRefused(
                f"model {name} {version}: file {file} points at {path!r}, not at this release "
                f"({model_file_path(name, version, file)})"
            )
        checked[file] = path
    return checked


def _parse_serial(name: str, serial: Any, state_serial: int) -> int:
    if not isinstance(serial, int) or isinstance(serial, bool) or not 0 <= serial <= state_serial:
        raise DesiredStateRefused(f"model {name}: serial must be an integer up to the state's {state_serial}")
    return serial


def _unsafe(path: str) -> bool:
    parts = path.split("/")
    return (
        path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or any(p in ("", ".", "..") for p in parts)
        or any(not FILE_RE.match(p) and not NAME_RE.match(p) for p in parts)
    )


def effective_models(
    group: DesiredState | None, device: DesiredState | None, device_id: str | None = None
) -> dict[str, DesiredModel]:
    """What this device should run: its group's models (a rollout's version where this device
    is in its share), with its own state's entries on top."""
    models: dict[str, DesiredModel] = {}
    if group is not None:
        for name, entry in group.models.items():
            rollout = entry.rollout
            moved = rollout is not None and device_id is not None and in_rollout(rollout, device_id)
            models[name] = (DesiredModel(name, rollout.version, rollout.files, rollout.serial, "rollout", rollout)
                            if moved and rollout is not None else entry)
    if device is not None:
        models.update(device.models)
    return models


@dataclass(frozen=True)
class Doorbell:
    """An untrusted hint from MQTT: refresh, and what the hub says it published."""

    targets_version: int | None
    serial: int | None
    raw: str

    @property
    def announces(self) -> str:
        parts = []
        if self.serial is not None:
            parts.append(f"desired serial {self.serial}")
        if self.targets_version is not None:
            parts.append(f"targets v{self.targets_version}")
        return ", ".join(parts) or "a refresh"


def parse_doorbell(payload: bytes) -> Doorbell | None:
    """A doorbell, or None for a payload that is not one (ignored, never an error)."""
    text = payload[:4096].decode("utf-8", "replace")
    try:
        body = json.loads(payload) if len(payload) <= 4096 else None
    except ValueError:
        body = None
    if not isinstance(body, dict) or body.get("schema") != DOORBELL_SCHEMA:
        return Doorbell(None, None, text) if text.strip() == "refresh" else None

    def integer(key: str) -> int | None:
        value = body.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

    return Doorbell(integer("targets_version"), integer("serial"), text)


def doorbell_payload(targets_version: int, serial: int, published_at: str) -> bytes:
    return json.dumps(
        {
            "schema": DOORBELL_SCHEMA,
            "refresh": True,
            "targets_version": targets_version,
            "serial": serial,
            "published_at": published_at,
        },
        sort_keys=True,
    ).encode()
