"""Telemetry over MQTT: the record (payload.py), the on-disk outbox, the publisher."""

from .outbox import Outbox, OutboxStats
from .payload import SCHEMA, RecordHeader, build_record
from .publisher import TelemetryPublisher

__all__ = ["SCHEMA", "Outbox", "OutboxStats", "RecordHeader", "TelemetryPublisher", "build_record"]
