"""The sync layer's error hierarchy.

Everything sync/ raises on purpose is a `SyncError`; the agent maps these to
update states, log lines or CLI messages in one place and never shows paho's or
the socket's own exceptions. Verdicts on bytes (signatures, hashes, policy) are
security/'s `RefusedError`s and reach the update state machine as they are.
Each class carries a short `code` published with a failed update state
(docs/mqtt.md lists them).
"""

from __future__ import annotations


class SyncError(Exception):
    """Base of every error sync/ raises on purpose."""

    code = "sync"


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


class HubError(SyncError):
    """The hub repository on disk cannot do what was asked (not a hub, missing key, bad bundle)."""

    code = "hub"


class HubUnreachable(SyncError):
    """The hub did not answer (connection refused, timeout, HTTP 5xx): try again later."""

    code = "hub-unreachable"


class DownloadFailed(SyncError):
    """A file could not be fetched completely (the server misbehaved, retries ran out)."""

    code = "download"


class DiskFull(SyncError):
    """Not enough free space for the files of an update (checked before downloading)."""

    code = "disk-full"


class ActivationFailed(SyncError):
    """A verified version could not be laid out or loaded."""

    code = "activation"


class HealthCheckFailed(SyncError):
    """A loaded version failed its probe (a real inference) or its health check."""

    code = "health-check"


class UpdateInterrupted(SyncError):
    """The agent stopped (crash, power loss) during activation of this version."""

    code = "interrupted"


class UpdateTimedOut(SyncError):
    """An update took longer than `updates.job_timeout_s`."""

    code = "timeout"
