"""MQTT topic names of the update flow (docs/mqtt.md describes each payload)."""

from __future__ import annotations

from typing import Literal

PREFIX = "edgefleet/v1"


def desired_topic(scope: Literal["group", "device"], target: str) -> str:
    """Retained doorbell for a group (`groups/<g>/desired`) or a device (`devices/<id>/desired`)."""
    return f"{PREFIX}/{'groups' if scope == 'group' else 'devices'}/{target}/desired"


def update_topic(device_id: str) -> str:
    """Update job transitions, agent -> hub (retained: the last one is the device's update state)."""
    return f"{PREFIX}/devices/{device_id}/update"


def cmd_topic(device_id: str) -> str:
    """Commands to one device (check-now, rollback), answered on the MQTT 5 response topic."""
    return f"{PREFIX}/devices/{device_id}/cmd"


def state_topic(device_id: str) -> str:
    """Retained birth / Last Will of a device (owned by the MQTT link)."""
    return f"{PREFIX}/devices/{device_id}/state"


ALL_UPDATES = f"{PREFIX}/devices/+/update"
ALL_STATES = f"{PREFIX}/devices/+/state"
