"""sync/'s error hierarchy: what can go wrong fetching, installing and publishing updates.

Verdicts on bytes (signatures, hashes, policy) are security/'s `RefusedError`s
and reach the update state machine as they are; these are the rest. Each carries
a `reason` code published with a failed state (docs/mqtt.md).
"""

from __future__ import annotations


class SyncError(Exception):
    """Base of every error sync/ raises on purpose."""

    reason = "sync"


class HubError(SyncError):
    """The hub repository on disk cannot do what was asked (not a hub, missing key, bad bundle)."""

    reason = "hub"


class HubUnreachable(SyncError):
    """The hub did not answer (connection refused, timeout, HTTP 5xx): try again later."""

    reason = "hub-unreachable"


class DownloadFailed(SyncError):
    """A file could not be fetched completely (the server misbehaved, retries ran out)."""

    reason = "download"


class DiskFull(SyncError):
    """Not enough free space for the files of an update (checked before downloading)."""

    reason = "disk-full"


class ActivationFailed(SyncError):
    """A verified version could not be laid out or loaded."""

    reason = "activation"


class HealthCheckFailed(SyncError):
    """A loaded version failed its probe (a real inference) or its health check."""

    reason = "health-check"


class UpdateInterrupted(SyncError):
    """The agent stopped (crash, power loss) during activation of this version."""

    reason = "interrupted"


class UpdateTimedOut(SyncError):
    """An update took longer than `updates.job_timeout_s`."""

    reason = "timeout"
