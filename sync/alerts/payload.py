"""The alert message, schema ``edgefleet.alert/1`` (every field: docs/mqtt.md#alerts).

The ``message`` is a fixed sentence per rule with the numbers filled in: nothing
read from outside the agent (a refusal reason, a model's output, a sensor label)
ever reaches it, so a fleet page may show it as it is.
"""

from __future__ import annotations

from typing import Any

from .engine import Transition

SCHEMA = "edgefleet.alert/1"

#: rule -> (what the value is, its unit)
DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "temperature": ("The hottest temperature sensor reads", "°C"),
    "memory": ("Memory in use on the machine is", "%"),
    "disk": ("The state directory's filesystem is", "% full"),
    "error_rate": ("API requests answered with a 5xx status within the window are", "%"),
    "ttft_p95": ("The 95th percentile time to first token within the window is", " s"),
    "model_failed": ("Models failed (load or probe):", ""),
    "update_refusals": ("Update refusals within the window:", ""),
    "energy_source_lost": ("Energy sources that stopped reading:", ""),
    "outbox_drops": ("Telemetry records and messages dropped within the window:", ""),
    "audit_dropping": ("Audit records lost within the window:", ""),
}


def _number(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.2f}".rstrip("0").rstrip(".")


def message(t: Transition) -> str:
    """The fixed sentence for a transition, e.g. "The state directory's filesystem is 93.2% full,
    above the limit of 90% full."."""
    what, unit = DESCRIPTIONS.get(t.rule, ("The value is", ""))
    value = "unknown" if t.value is None else f"{_number(t.value)}{unit}"
    if t.state == "firing":
        return f"{what} {value}, above the limit of {_number(t.threshold)}{unit}."
    return f"{what} {value}, back at or below {_number(t.resolve)}{unit}: resolved."


def unit(rule: str) -> str:
    return DESCRIPTIONS.get(rule, ("", ""))[1].strip().removesuffix(" full") or "count"


def alert_payload(t: Transition, device: str, group: str) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "rule": t.rule,
        "state": t.state,
        "severity": t.severity,
        "value": None if t.value is None else round(t.value, 4),
        "threshold": t.threshold,
        "resolve": t.resolve,
        "unit": unit(t.rule),
        "since": round(t.since, 3),
        "at": round(t.at, 3),
        "message": message(t),
        "device": device,
        "group": group,
    }
