"""``<hub>/webhooks.toml``: which URLs get which fleet events, signed with which key.

    [[webhook]]
    name = "ops"                                  # optional; default: the URL
    url = "https://ops.example.com/edgefleet"
    secret_file = "webhook-ops.key"               # relative to the hub directory; 0600
    events = ["device.offline", "alert.*"]        # optional; default: every kind
    timeout_s = 10.0

Read once at start-up by the TOML loader the agent's config uses (runtime/structured.py),
so a typo is one line naming the key. The HMAC key is read from its own file, never from
the TOML (which an operator may show around), and a key file that others may read is
refused: a webhook signature is only as good as the secrecy of its key.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from runtime.structured import SchemaError, from_mapping

from ...errors import HubError

CONFIG_FILE = "webhooks.toml"

#: every event kind a webhook can ask for (docs/operations.md, "Webhooks")
EVENT_KINDS = (
    "device.online", "device.offline",
    "update",
    "rollout.step", "rollout.paused", "rollout.resumed", "rollout.completed", "rollout.aborted",
    "alert.firing", "alert.resolved",
)


class WebhookConfigError(HubError):
    """webhooks.toml or a key file is not usable; the message is one line naming the key."""


@dataclass
class WebhookEntry:
    """One ``[[webhook]]`` table, as written."""

    url: str
    secret_file: str
    name: str | None = None
    events: list[str] = field(default_factory=lambda: ["*"])
    timeout_s: float = 10.0
    #: events kept for this endpoint while it is away; past it the oldest are dropped and counted
    max_queue: int = 10_000
    #: backoff after a failed attempt: from `retry_min_s`, doubling, up to `retry_max_s` (with jitter)
    retry_min_s: float = 1.0
    retry_max_s: float = 300.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url: {self.url!r} is not an http:// or https:// URL")
        for pattern in self.events:
            if not matches_any(pattern):
                raise ValueError(f"events: unknown event kind {pattern!r} (known: {', '.join(EVENT_KINDS)}, "
                                 "a family such as \"alert.*\", or \"*\")")
        if not 0 < self.timeout_s <= 300:
            raise ValueError(f"timeout_s: must be above 0 and at most 300, got {self.timeout_s:g}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue: must be at least 1, got {self.max_queue}")
        if not 0 < self.retry_min_s <= self.retry_max_s:
            raise ValueError("retry_min_s: must be above 0 and at most retry_max_s")


@dataclass
class WebhooksFile:
    webhook: list[WebhookEntry] = field(default_factory=list)


@dataclass(frozen=True)
class Endpoint:
    """A configured webhook, its key read: what the senders work with."""

    name: str
    url: str
    secret: bytes = field(repr=False)
    events: tuple[str, ...]
    timeout_s: float
    max_queue: int
    retry_min_s: float
    retry_max_s: float

    def wants(self, kind: str) -> bool:
        return any(event_matches(pattern, kind) for pattern in self.events)


def event_matches(pattern: str, kind: str) -> bool:
    """"*" is every kind, "alert.*" every kind of that family, anything else itself."""
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return kind.startswith(pattern[:-1])
    return pattern == kind


def matches_any(pattern: str) -> bool:
    return any(event_matches(pattern, kind) for kind in EVENT_KINDS)


def load_endpoints(hub_dir: Path) -> list[Endpoint]:
    """The endpoints of ``<hub_dir>/webhooks.toml``; raises `WebhookConfigError` with one line."""
    path = Path(hub_dir) / CONFIG_FILE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WebhookConfigError(f"{path}: no such file (add a [[webhook]] table with url and secret_file; "
                                 "docs/operations.md, \"Webhooks\")") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WebhookConfigError(f"{path}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise WebhookConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        entries = from_mapping(WebhooksFile, data).webhook
    except SchemaError as exc:
        raise WebhookConfigError(f"{path}: {exc}") from None
    if not entries:
        raise WebhookConfigError(f"{path}: no [[webhook]] table: nothing to post to")
    endpoints, names = [], set()
    for i, entry in enumerate(entries):
        name = entry.name or entry.url
        if name in names:
            raise WebhookConfigError(f"{path}: webhook[{i}].name: {name!r} is used twice (each webhook has its "
                                     "own queue, kept under its name)")
        names.add(name)
        secret = read_secret(Path(hub_dir), entry.secret_file, f"{path}: webhook[{i}].secret_file")
        endpoints.append(Endpoint(name, entry.url, secret, tuple(entry.events), entry.timeout_s, entry.max_queue,
                                  entry.retry_min_s, entry.retry_max_s))
    return endpoints


def read_secret(hub_dir: Path, name: str, where: str) -> bytes:
    """The key in `name` (relative to the hub directory), without its trailing newline; refused
    when the file is readable by anyone but its owner, or empty."""
    path = Path(name) if os.path.isabs(name) else hub_dir / name
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            secret = handle.read().strip()
    except OSError as exc:
        raise WebhookConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise WebhookConfigError(f"{where}: {path} is readable by others (mode {stat.S_IMODE(mode):04o}); "
                                 f"the key must be private: chmod 600 {path}")
    if len(secret) < 16:
        raise WebhookConfigError(f"{where}: {path} holds {len(secret)} bytes; use a random key of at least 16 "
                                 "(e.g. openssl rand -hex 32)")
    return secret

