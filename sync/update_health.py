"""The update service's own health, as the fleet sees it in the reported state.

An operator must tell "updated" from "never heard of it": a device whose hub URL
is wrong, whose trust root cannot be read or whose updates are off looks, from
its update topic alone, exactly like one that is up to date. So the service keeps
what its last look at the hub found, since when, and when it last succeeded, and
agent/fleet/reported.py publishes it (retained) beside the versions.

Times are the device's clock (Unix seconds): the hub shows them, and never waits
on them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Health(StrEnum):
    OK = "ok"
    #: the last look at the hub did not complete (connection, timeout, a cut transfer)
    HUB_UNREACHABLE = "hub-unreachable"
    #: the hub answered, and what it signed was refused (signature, expiry, rollback, policy)
    REFUSED = "refused"
    #: the device's trust root is missing or unreadable: it can verify nothing
    TRUST_ROOT_UNREADABLE = "trust-root-unreadable"
    #: ``[updates] hub_url`` is unset
    DISABLED = "disabled"


@dataclass
class UpdateHealth:
    state: Health = Health.OK
    code: str | None = None
    message: str | None = None
    since: float = field(default_factory=time.time)
    #: the last look at the hub, whatever came of it
    last_check: float | None = None
    #: the last look that verified the hub's metadata
    last_success: float | None = None

    def checked(self, state: Health, code: str | None = None, message: str | None = None) -> None:
        """Record one look at the hub and what came of it; `since` moves only on a change."""
        now = time.time()
        self.last_check = now
        if state is Health.OK:
            self.last_success = now
        self.set(state, code, message)

    def set(self, state: Health, code: str | None = None, message: str | None = None) -> None:
        if state is not self.state:
            self.since = time.time()
        self.state, self.code, self.message = state, code, message

    def to_json(self) -> dict[str, Any]:
        return {
            "health": self.state.value,
            "code": self.code,
            "message": self.message,
            "since": round(self.since, 3),
            "last_check": _round(self.last_check),
            "last_success": _round(self.last_success),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
