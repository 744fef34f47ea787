"""The MQTT link shared by telemetry, signed updates and commands (see docs/mqtt.md)."""

from .link import ConnectInfo, InboundMessage, LinkStatus, MqttLink, encode_payload
from .settings import MqttSettings, default_device_id
from .topics import Topics

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
