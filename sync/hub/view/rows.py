"""What the fleet page shows: one row per device, one per rollout, and the chart points.

Pure: takes `DeviceView`s (sync/hub/fleet.py) and `hub status`'s flags
(sync/hub/status.py: offline, behind, failing, refused, unreachable, disabled,
unexpected — the same logic, not re-derived here) and returns plain JSON for the page.
Every text that came from a device is cut to `MAX_TEXT` characters; the page puts
each one in the DOM as text (textContent), never as markup.
"""

from __future__ import annotations

from typing import Any

from ..fleet import DeviceView, FleetView
from ..rollouts.record import OUTCOMES
from ..status import device_rows

MAX_TEXT = 300
#: how many failing devices and history events of a rollout the page gets
ROLLOUT_DEVICES = 50
ROLLOUT_HISTORY = 20


def flags_of(fleet: FleetView, device_ids: list[str], now: float) -> dict[str, dict[str, Any]]:
    """device -> `hub status`'s row (flags, desired vs active) for those devices; presence on the
    hub's clock as this process saw it."""
    views = {d: fleet.devices[d] for d in device_ids if d in fleet.devices}
    presence = {d: {"online": v.online, "since": v.online_since if v.online else v.offline_since}
                for d, v in views.items() if v.online is not None}
    part = FleetView(fleet.prefix, devices=views)
    return {row["device"]: row for row in device_rows(part, now, None, presence)}


def device_row(view: DeviceView, status: dict[str, Any]) -> dict[str, Any]:
    reported = _dict(view.reported)
    updates = _dict(reported.get("updates"))
    telemetry = _dict(view.telemetry)
    models = []
    for name in sorted(set(status.get("desired") or {}) | set(status.get("models") or {})):
        desired = _dict((status.get("desired") or {}).get(name))
        reported_model = _dict(_dict(reported.get("models")).get(name))
        models.append({"name": _text(name), "desired": _text(desired.get("version")),
                       "origin": _text(desired.get("origin")), "rollout": _text(desired.get("rollout")),
                       "active": _text((status.get("models") or {}).get(name)),
                       "state": _text(reported_model.get("state")), "job": _text(reported_model.get("job"))})
    update = _dict(view.update)
    last_job = _dict(status.get("last_job")) or update
    flags = status.get("flags") or {}
    problems = sorted(flags) + (["alerting"] if view.alerts else [])
    return {
        "device": view.device_id, "group": view.group, "online": view.online,
        "since": view.online_since if view.online else view.offline_since,
        "offline_reason": _text(_dict(view.state).get("reason")) if view.online is False else None,
        "agent_version": _text(reported.get("agent_version") or _dict(view.state).get("agent_version")
                               or telemetry.get("agent_version")),
        "models": models,
        "update": {"state": _text(update.get("state") or last_job.get("state")),
                   "model": _text(update.get("model") or last_job.get("model")),
                   "version": _text(update.get("version") or last_job.get("version")),
                   "code": _text(update.get("code") or last_job.get("code")),
                   "message": _text(update.get("message") or last_job.get("message"))}
        if update or last_job else None,
        "health": {"health": _text(updates.get("health")), "code": _text(updates.get("code")),
                   "message": _text(updates.get("message")), "since": _num(updates.get("since")),
                   "last_success": _num(updates.get("last_success"))} if updates else None,
        "telemetry": telemetry_summary(telemetry, view.tokens_per_s) if telemetry else None,
        "telemetry_at": view.telemetry_at,
        "alerts": [{"rule": _text(rule), "severity": _text(a.get("severity")), "message": _text(a.get("message")),
                    "value": _num(a.get("value")), "since": _num(a.get("since"))}
                   for rule, a in sorted(view.alerts.items())],
        "flags": {name: _flag_text(name, value) for name, value in flags.items()},
        "problems": problems,
    }


def telemetry_summary(telemetry: dict[str, Any], tokens_per_s: dict[str, float]) -> dict[str, Any]:
    system = _dict(telemetry.get("system"))
    energy = _dict(telemetry.get("energy"))
    memory = _dict(system.get("system.memory.usage"))
    limit = _num(system.get("system.memory.limit"))
    used = _num(memory.get("used"))
    temps = [v for v in _dict(system.get("hw.temperature")).values() if isinstance(v, int | float)]
    cpu = _num(system.get("system.cpu.utilization"))
    sources = [s for s in (_dict(energy.get("covers")).get("sources") or []) if isinstance(s, str)]
    models = _dict(telemetry.get("models"))
    return {
        "cpu_pct": round(cpu * 100, 1) if cpu is not None else None,
        "memory_pct": round(100 * used / limit, 1) if used is not None and limit else None,
        "memory_used": used, "memory_limit": limit,
        "temperature_c": round(max(temps), 1) if temps else None,
        "power_w": _num(energy.get("hw.host.power")),
        "energy_method": _text(energy.get("method")),
        "energy_source": _text("; ".join(sources)) if sources else None,
        "j_per_token": {_text(n): _num(_dict(m).get("joules_per_token")) for n, m in sorted(models.items())},
        "tokens_per_s": dict(tokens_per_s),
        "time": _num(telemetry.get("time")),
    }


def points(view: DeviceView, received_at: float) -> list[tuple[str, str, float, float]]:
    """The chart points of the device's latest telemetry record: (device, series, t, value),
    at the record's own time (a device's clock; a chart, not a decision)."""
    if not view.telemetry:
        return []
    summary = telemetry_summary(view.telemetry, view.tokens_per_s)
    t = summary["time"] if summary["time"] is not None else received_at
    out = []
    for series, key in (("power_w", "power_w"), ("memory_pct", "memory_pct"), ("temperature_c", "temperature_c"),
                        ("cpu_pct", "cpu_pct")):
        if summary[key] is not None:
            out.append((view.device_id, series, t, float(summary[key])))
    if view.tokens_per_s:
        out.append((view.device_id, "tokens_per_s", t, float(sum(view.tokens_per_s.values()))))
    for model, value in summary["j_per_token"].items():
        if value is not None and model:
            out.append((view.device_id, f"j_per_token:{model}", t, float(value)))
    return out


def job_event(view: DeviceView) -> dict[str, Any] | None:
    """The update job transition just received, as the device page's job history lists it."""
    update = _dict(view.update)
    if not update:
        return None
    fields = ("job", "model", "version", "from_version", "state", "code", "message")
    return {k: _text(update.get(k)) for k in fields} | {"seq": _num(update.get("seq")), "at": _num(update.get("at"))}


def rollout_row(body: dict[str, Any]) -> dict[str, Any]:
    plan = _dict(body.get("plan"))
    failing = _dict(body.get("failing"))
    raw_counts = _dict(body.get("counts"))
    counts = {k: raw_counts[k] for k in OUTCOMES if isinstance(raw_counts.get(k), int)}
    return {
        "id": _text(body.get("id")), "group": _text(body.get("group")), "model": _text(body.get("model")),
        "from_version": _text(body.get("from_version")), "to_version": _text(body.get("to_version")),
        "state": _text(body.get("state")), "step": body.get("step") if isinstance(body.get("step"), int) else 0,
        "steps": [s for s in plan.get("steps") or [] if isinstance(s, int | float)],
        "percent": _num(body.get("percent")), "counts": counts,
        "in_step": raw_counts.get("in_step") if isinstance(raw_counts.get("in_step"), int) else None,
        "reason": _text(body.get("reason")), "note": _text(body.get("note")), "decision": _text(body.get("decision")),
        "failing": [{"device": _text(d), "outcome": _text(_dict(o).get("outcome")), "code": _text(_dict(o).get("code")),
                     "message": _text(_dict(o).get("message"))} for d, o in sorted(failing.items())[:ROLLOUT_DEVICES]],
        "failing_total": len(failing),
        "history": [{"at": _num(_dict(h).get("at")), "event": _text(_dict(h).get("event")),
                     "percent": _num(_dict(h).get("percent")), "reason": _text(_dict(h).get("reason"))}
                    for h in (body.get("history") or [])[-ROLLOUT_HISTORY:]],
        "created_at": _num(body.get("created_at")), "finished_at": _num(body.get("finished_at")),
    }


def _flag_text(name: str, value: Any) -> str:
    """A flag in a few words (the details the page shows beside its name)."""
    if name in ("failing", "unexpected") and isinstance(value, list):
        return _text(", ".join(f"{_dict(v).get('model')}" + (f" ({_dict(v).get('code')})" if _dict(v).get("code")
                                                              else "") for v in value)) or ""
    if name == "behind" and isinstance(value, list):
        return _text(", ".join(str(v) for v in value)) or ""
    if name == "refused":
        return _text(" ".join(str(x) for x in (_dict(value).get("code"), _dict(value).get("message")) if x)) or ""
    if name == "unreachable":
        return _text(_dict(value).get("message")) or ""
    if name == "offline":
        return _text(_dict(value).get("reason")) or ""
    return ""


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "…"


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
