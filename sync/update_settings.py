"""The ``[updates]`` section of the agent's config: where the hub is and what to trust.

Lives in sync/ because the update service is its only reader; agent/config.py
makes it the ``updates`` field of `AgentConfig`. Updates are off while
`hub_url` is unset. The device's id and group are the MQTT link's
(``[mqtt] device_id``, ``group``): one identity for every topic and every
desired state.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlparse


@dataclass(frozen=True)
class UpdateSettings:
    #: The hub's repository URL (``metadata/`` and ``targets/`` below it); unset: updates off.
    hub_url: str | None = None
    #: Root metadata this device was provisioned with (``hub init`` writes trust-root.json).
    trust_root: str = "/etc/edgefleet/root.json"
    #: How often to look at the hub while the MQTT doorbell cannot ring (MQTT off or disconnected).
    poll_interval_s: float = 300.0
    #: How often to look at the hub while connected too, so one lost doorbell (or a release
    #: published without one) cannot stall a device for longer (Mender polls every 30 min).
    check_interval_s: float = 1800.0
    #: Each wait is drawn from interval x [1 - jitter, 1 + jitter], so a fleet that started (or
    #: reconnected) together does not look at the hub together.
    check_jitter: float = 0.2
    #: After a look at the hub or a download that failed for a cause that may pass (the hub or
    #: the link away, a full disk, a timeout), look again this soon, doubling per failure up to
    #: the check interval (Mender's RetryPollIntervalSeconds), jittered the same way.
    retry_min_s: float = 30.0
    #: Real inferences a new version must answer after it starts serving, and their spacing.
    health_checks: int = 3
    health_check_interval_s: float = 1.0
    #: Activations a crash may interrupt before the version is given up (rolled back, denied).
    max_activation_attempts: int = 2
    #: An update job that takes longer than this ends failed (reason "timeout").
    job_timeout_s: float = 3600.0
    download_retries: int = 5
    #: A download that receives nothing for this long is cut and resumed.
    read_timeout_s: float = 30.0
    #: One look at the hub (all of its TUF metadata and desired states) that takes longer is
    #: given up as hub-unreachable, however steadily the bytes trickle in.
    refresh_timeout_s: float = 120.0
    #: Versions kept on disk per model besides current, previous and the last confirmed.
    keep_versions: int = 2
    #: Free space that must remain after an update's downloads, in MB.
    min_free_mb: int = 256

    def __post_init__(self) -> None:
        if self.hub_url is not None:
            url = urlparse(self.hub_url)
            if url.scheme not in ("http", "https") or not url.netloc:
                raise ValueError(f"hub_url must be an http(s) URL, got {self.hub_url!r}")
        if not 0 <= self.check_jitter < 1:
            raise ValueError("check_jitter must be at least 0 and below 1")
        for name in ("poll_interval_s", "check_interval_s", "retry_min_s", "health_check_interval_s", "job_timeout_s",
                     "read_timeout_s", "refresh_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be more than 0")
        for name in ("health_checks", "max_activation_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("download_retries", "keep_versions", "min_free_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more")

    @property
    def enabled(self) -> bool:
        return self.hub_url is not None

    def next_wait(self, connected: bool, draw: float, failures: int = 0) -> float:
        """Seconds until the next look at the hub on the timer, after `failures` looks or jobs in
        a row that failed for a cause that may pass; `draw` is uniform in [0, 1)."""
        interval = self.check_interval_s if connected else self.poll_interval_s
        if failures:
            interval = min(interval, self.retry_min_s * 2 ** min(failures - 1, 30))
        if not connected and not failures:
            return interval
        return interval * (1 - self.check_jitter + 2 * self.check_jitter * draw)
