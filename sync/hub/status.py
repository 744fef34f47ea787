"""`hub status`: per device, what it should run against what it runs, and what is wrong.

Desired comes from the hub's own signed desired states when the hub directory is
at hand (group + device state, rollout membership by `security.desired.effective_models`,
the same resolution a device makes), else from what the device reports it was told.
Everything else comes from the device's retained messages (sync/hub/rollouts/fleet.py).
Pure: the caller reads MQTT and the hub directory.

Flags (docs/operations.md, "Fleet status"):

- ``offline``: the last state is the Last Will or a clean stop (with how long, on the
  hub's clock when the rollout controller saw it go, else since the device's last message);
- ``behind``: a model's desired version is not the active one, and no job toward it failed;
- ``failing``: the last job toward a desired version ended failed or rolled-back;
- ``refused``: the update service's health is ``refused`` or its last job was rejected;
- ``unreachable``: health ``hub-unreachable`` (with since when);
- ``disabled``: updates are switched off on the device;
- ``unexpected``: a model serves a version the device was never told to run (neither the
  hub's desired version nor the one the device reports being told), with no job to explain it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from security.desired import DesiredModel, DesiredState, effective_models

from .fleet import FAILED_STATES, DeviceView, FleetView

FLAGS = ("offline", "behind", "failing", "refused", "unreachable", "disabled", "unexpected")
DesiredLookup = Callable[[str, str | None], Mapping[str, DesiredModel] | None]


def hub_desired(group_states: Mapping[str, DesiredState | None],
                device_states: Mapping[str, DesiredState | None]) -> DesiredLookup:
    """A lookup (device id, group) -> the models the hub's signed states give that device."""
    def lookup(device_id: str, group: str | None) -> Mapping[str, DesiredModel] | None:
        group_state = group_states.get(group) if group else None
        device_state = device_states.get(device_id)
        if group_state is None and device_state is None:
            return None
        return effective_models(group_state, device_state, device_id)
    return lookup


def device_rows(fleet: FleetView, now: float, desired: DesiredLookup | None = None,
                presence: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    return [_row(view, now, desired, (presence or {}).get(view.device_id))
            for _, view in sorted(fleet.devices.items())]


def _row(view: DeviceView, now: float, desired: DesiredLookup | None, seen: Any) -> dict[str, Any]:
    reported = view.reported or {}
    updates: dict[str, Any] = reported["updates"] if isinstance(reported.get("updates"), dict) else {}
    hub_models = desired(view.device_id, view.group) if desired is not None else None
    names = set(hub_models or {}) | set(_models(reported)) | set(_models(view.state))
    models = {name: _model(view, name, hub_models) for name in sorted(names)}
    health = updates.get("health") if isinstance(updates.get("health"), str) else None
    last_job = reported.get("last_job") if isinstance(reported.get("last_job"), dict) else view.update
    flags: dict[str, Any] = {}
    if view.online is False:
        since = seen.get("since") if isinstance(seen, dict) and seen.get("online") is False else None
        flags["offline"] = {"for_s": round(now - since, 1) if isinstance(since, int | float) else None,
                            "last_heard_device_clock": _last_heard(view),
                            "reason": (view.state or {}).get("reason")}
    for name, model in models.items():
        if model["failing"]:
            flags.setdefault("failing", []).append({"model": name, **model["failing"]})
        elif model["desired"] and model["desired"]["version"] != model["active"]:
            flags.setdefault("behind", []).append(name)
        if model["unexpected"]:
            flags.setdefault("unexpected", []).append({"model": name, "active": model["active"]})
    if health == "refused" or (isinstance(last_job, dict) and last_job.get("state") == "rejected"):
        flags["refused"] = {"code": updates.get("code") or (last_job or {}).get("code"),
                            "message": updates.get("message") or (last_job or {}).get("message")}
    if health == "hub-unreachable":
        flags["unreachable"] = {"since": updates.get("since"), "message": updates.get("message")}
    if health == "trust-root-unreadable":
        flags["refused"] = {"code": "trust-root-unreadable", "message": updates.get("message")}
    if health == "disabled":
        flags["disabled"] = True
    return {
        "device": view.device_id, "group": view.group, "online": view.online,
        "health": health, "last_success": updates.get("last_success"), "last_check": updates.get("last_check"),
        "desired_from": "hub" if hub_models is not None else ("device" if view.reported else None),
        #: name -> the active version (as before issue 23), and name -> what it should run
        "models": {n: m["active"] for n, m in models.items() if m["active"] is not None},
        "desired": {n: m["desired"] for n, m in models.items()},
        "jobs": {n: m["job"] for n, m in models.items() if m["job"]},
        "update": {k: view.update.get(k) for k in ("state", "model", "version", "code", "message", "seq", "at")}
        if view.update else None,
        "last_job": {k: last_job.get(k) for k in ("model", "version", "state", "code", "message")}
        if isinstance(last_job, dict) else None,
        "flags": flags,
    }


def _model(view: DeviceView, name: str, hub_models: Mapping[str, DesiredModel] | None) -> dict[str, Any]:
    told = view.desired(name)
    if hub_models is not None:
        entry = hub_models.get(name)
        want = ({"version": entry.version, "origin": entry.origin,
                 "rollout": entry.rollout.id if entry.origin == "rollout" and entry.rollout else None}
                if entry is not None else None)
    else:
        want = ({"version": told.get("version"), "origin": told.get("origin"), "rollout": told.get("rollout")}
                if told else None)
    active = view.active(name)
    reported_model = _models(view.reported).get(name)
    job = reported_model.get("job") if isinstance(reported_model, dict) else None
    last = _last_job(view, name)
    failing = None
    if want and want["version"] != active and last and last.get("version") == want["version"] \
            and last.get("state") in ("failed", "rolled-back"):
        failing = {"version": last.get("version"), "state": last.get("state"), "code": last.get("code")}
    explained = job or (last and last.get("state") in FAILED_STATES)
    told_version = told.get("version") if told else None
    unexpected = (active is not None and want is not None and active not in (want["version"], told_version)
                  and not explained)
    return {"desired": want, "active": active, "job": job, "failing": failing, "unexpected": unexpected}


def _last_job(view: DeviceView, name: str) -> dict[str, Any] | None:
    jobs_last = (view.reported or {}).get("jobs_last")
    if isinstance(jobs_last, dict) and isinstance(jobs_last.get(name), dict):
        return jobs_last[name]
    update = view.update or {}
    return update if update.get("model") == name else None


def _models(body: dict[str, Any] | None) -> dict[str, Any]:
    models = (body or {}).get("models")
    return models if isinstance(models, dict) else {}


def _last_heard(view: DeviceView) -> float | None:
    times = [b.get("at") for b in (view.reported, view.state, view.update) if isinstance(b, dict)]
    numbers = [t for t in times if isinstance(t, int | float)]
    return max(numbers) if numbers else None
