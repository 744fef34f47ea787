"""The ``[mqtt]`` section of the agent's config: where the broker is, who we are.

Lives in sync/ because the link is its only reader; agent/config.py makes it the
``mqtt`` field of `AgentConfig`, so it is parsed and validated with the rest of the
config (keyed messages, environment overrides). MQTT is off while `host` is unset.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

#: the ``protocol`` setting's values (sync/mqtt/protocol.py says what each does); here, so the
#: settings read without paho
PROTOCOLS = ("5", "3.1.1", "auto")

#: Device ids and group names become single topic levels: no '/', '+', '#', spaces.
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MACHINE_ID = Path("/etc/machine-id")


def default_device_id() -> str:
    """The host name when it is a valid topic level, else ``m-`` + the first 12 of machine-id."""
    host = socket.gethostname().split(".")[0]
    if ID_RE.match(host) and host != "localhost":
        return host
    try:
        machine = _MACHINE_ID.read_text(encoding="ascii").strip()
    except OSError:
        machine = ""
    return f"m-{machine[:12]}" if re.fullmatch(r"[0-9a-f]{12,}", machine) else "edgefleet-device"


@dataclass(frozen=True)
class MqttSettings:
    #: Broker host name or address; unset (the default) turns MQTT off.
    host: str | None = None
    #: 1883, or 8883 with TLS when left at 0.
    port: int = 0
    tls: bool = False
    #: CA bundle that signs the broker's certificate (default: the system's trust store).
    ca_file: str | None = None
    #: Client certificate and key, for brokers that authenticate devices by certificate.
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    #: Either the password itself or a file holding it (first line), not both.
    password: str | None = None
    password_file: str | None = None
    device_id: str = field(default_factory=default_device_id)
    group: str = "default"
    topic_prefix: str = "edgefleet/v1"
    keepalive_s: int = 60
    #: MQTT version: "5", "3.1.1", or "auto" (MQTT 5, falling back to 3.1.1 when the broker
    #: refuses it; see docs/mqtt.md "MQTT 3.1.1 brokers" for what 3.1.1 lacks). A bare 5 is
    #: taken as "5" (what EDGEFLEET_MQTT__PROTOCOL=5 parses to).
    protocol: str | int = "auto"
    #: How long the broker keeps our session (subscriptions, queued QoS 1) while we are away.
    session_expiry_s: int = 7 * 24 * 3600
    #: paho's reconnect backoff: first wait, doubled per failed attempt up to the max.
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    #: What may wait in memory for the broker while it is away (update reports; each telemetry
    #: batch): at most this many bytes and this many messages; past either the oldest are
    #: dropped and counted (edgefleet_mqtt_send_dropped_*).
    send_queue_max_bytes: int = 1024 * 1024
    send_queue_max_messages: int = 1000

    def __post_init__(self) -> None:
        if self.host is not None and not self.host.strip():
            raise ValueError("host must not be empty (leave it unset to turn MQTT off)")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if not ID_RE.match(self.device_id):
            raise ValueError(f"device_id {self.device_id!r} must be 1-128 of A-Z a-z 0-9 . _ - "
                             "(it is one topic level)")
        if not ID_RE.match(self.group):
            raise ValueError(f"group {self.group!r} must be 1-128 of A-Z a-z 0-9 . _ - (it is one topic level)")
        levels = self.topic_prefix.split("/")
        if not self.topic_prefix or any(not lv or lv in ("+", "#") or "+" in lv or "#" in lv for lv in levels):
            raise ValueError(f"topic_prefix {self.topic_prefix!r} must be non-empty levels without + or #")
        if isinstance(self.protocol, int) and not isinstance(self.protocol, bool) and self.protocol == 5:
            object.__setattr__(self, "protocol", "5")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f'protocol must be "5", "3.1.1" or "auto", got {self.protocol!r}')
        if not 5 <= self.keepalive_s <= 65535:
            raise ValueError("keepalive_s must be 5..65535")
        if not 0 <= self.session_expiry_s <= 0xFFFFFFFF:
            raise ValueError("session_expiry_s must be 0..4294967295")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError("reconnect_min_s must be > 0 and at most reconnect_max_s")
        if not 1024 <= self.send_queue_max_bytes <= 1 << 30:
            raise ValueError("send_queue_max_bytes must be 1024..1073741824")
        if not 1 <= self.send_queue_max_messages <= 1_000_000:
            raise ValueError("send_queue_max_messages must be 1..1000000")
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        if (self.password is not None or self.password_file is not None) and self.username is None:
            raise ValueError("a password needs a username")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if not self.tls and any(f is not None for f in (self.ca_file, self.cert_file)):
            raise ValueError("ca_file / cert_file are set but tls = false")

    @property
    def enabled(self) -> bool:
        return self.host is not None

    @property
    def broker_port(self) -> int:
        return self.port or (8883 if self.tls else 1883)

    @property
    def client_id(self) -> str:
        """Stable across restarts, so the broker resumes our persistent session."""
        return f"edgefleet-{self.device_id}"

    def read_password(self) -> str | None:
        if self.password_file is None:
            return self.password
        try:
            return Path(self.password_file).read_text(encoding="utf-8").splitlines()[0]
        except (OSError, IndexError) as exc:
            raise ValueError(f"mqtt.password_file {self.password_file}: cannot read a password: {exc}") from None
