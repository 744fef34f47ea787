"""The MQTT link shared by telemetry, signed updates and commands (see docs/mqtt.md).

The link's names (everything from `.link`) are loaded on first use, because `.link` imports
paho: the settings and topics are read by every agent, paho only by one with ``[mqtt]``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .settings import MqttSettings, default_device_id
from .topics import Topics

if TYPE_CHECKING:
    from .link import ConnectInfo, InboundMessage, LinkStatus, MqttLink, encode_payload

_FROM_LINK = frozenset({"ConnectInfo", "InboundMessage", "LinkStatus", "MqttLink", "encode_payload"})

__all__ = [
    "ConnectInfo",
    "InboundMessage",
    "LinkStatus",
    "MqttLink",
    "MqttSettings",
    "Topics",
    "default_device_id",
    "encode_payload",
]


def __getattr__(name: str) -> Any:
    if name in _FROM_LINK:
        return getattr(importlib.import_module(".link", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
