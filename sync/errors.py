"""The sync layer's error hierarchy.

Everything sync/ raises on purpose is a `SyncError`; the agent maps these to
update states, log lines or CLI messages in one place and never shows paho's or
the socket's own exceptions.
"""

from __future__ import annotations


class SyncError(Exception):
    """Base of every error sync/ raises on purpose."""


class LinkClosedError(SyncError):
    """The MQTT link was stopped before the operation completed (agent shutdown)."""


class PublishRefusedError(SyncError):
    """The broker answered a QoS 1 publish with a failure reason code (MQTT 5 PUBACK)."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"broker refused the message on {topic}: {reason}")
        self.topic = topic
        self.reason = reason


class SubscribeRefusedError(SyncError):
    """The broker refused a subscription (SUBACK with a failure reason code)."""

    def __init__(self, topic_filter: str, reason: str) -> None:
        super().__init__(f"broker refused the subscription {topic_filter}: {reason}")
        self.topic_filter = topic_filter
        self.reason = reason


class NotConnectedError(SyncError):
    """An operation needed a live broker connection and there was none."""
