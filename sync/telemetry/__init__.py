"""Telemetry over MQTT: the record (payload.py), the on-disk outbox, the publisher."""

from .outbox import Outbox, OutboxStats, OutboxStorageError
from .payload import SCHEMA, RecordHeader, build_record
from .publisher import StorageHealth, TelemetryPublisher

__all__ = ["SCHEMA", "Outbox", "OutboxStats", "OutboxStorageError", "RecordHeader", "StorageHealth",
           "TelemetryPublisher", "build_record"]
