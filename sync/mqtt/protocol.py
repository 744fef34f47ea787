"""Which MQTT version the link speaks, and what stands in for MQTT 5 on a 3.1.1 broker.

`ProtocolChoice` is the ``[mqtt] protocol`` setting as a small state machine with
no I/O in it (the link does the connecting and asks it what to do): ``"5"`` and
``"3.1.1"`` are fixed; ``"auto"`` starts with MQTT 5 and falls back to 3.1.1 when
the broker refuses the version, either with a CONNACK saying so or, like
RabbitMQ's MQTT plugin, by closing the connection at the CONNECT. Once a
connection succeeds the version is kept for the life of the process, so a v5
broker whose connection drops later is never mistaken for a 3.1.1 one.

`reply_fields_from_body` is the fallback for a command's MQTT 5 response topic
and correlation data: on 3.1.1 a command's JSON carries them (docs/mqtt.md).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from paho.mqtt.enums import MQTTProtocolVersion

from .settings import PROTOCOLS

log = logging.getLogger(__name__)

#: CONNACK "Unsupported Protocol Version" (MQTT 5 reason 0x84; paho maps a 3.1.1 return code 1 to it).
UNSUPPORTED_PROTOCOL_VERSION = 0x84
#: Closes before any CONNACK that "auto" takes as a refusal of MQTT 5: more than one, so a single
#: dropped connection on a flaky link does not cost a v5 broker its MQTT 5 features.
CLOSES_BEFORE_FALLBACK = 2
#: The longest response topic / correlation a command's JSON may carry.
MAX_REPLY_FIELD = 1024

V5 = MQTTProtocolVersion.MQTTv5
V311 = MQTTProtocolVersion.MQTTv311


def protocol_name(version: MQTTProtocolVersion) -> str:
    return "5" if version == V5 else "3.1.1"


class ProtocolChoice:
    """The version to connect with next, from the setting and what the broker said so far."""

    def __init__(self, setting: str) -> None:
        if setting not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {setting!r}")
        self.setting = setting
        self.version = V311 if setting == "3.1.1" else V5
        #: set at the first successful connect; "auto" no longer changes its mind after it
        self.settled = setting != "auto"
        #: why "auto" fell back to 3.1.1 (for the log line), None while it has not
        self.why: str | None = None
        self._closes = 0
        self._announced = False

    @property
    def name(self) -> str:
        return protocol_name(self.version)

    def refused(self, reason_value: int) -> bool:
        """The broker answered the CONNECT with a failure; True when "auto" now tries 3.1.1."""
        if reason_value == UNSUPPORTED_PROTOCOL_VERSION:
            return self._fall_back(f"the broker refused MQTT 5 (CONNACK {reason_value:#x})")
        return False

    def closed_before_connack(self) -> bool:
        """The broker closed the connection without answering the CONNECT; True when "auto"
        now tries 3.1.1."""
        if self.settled or self.version != V5:
            return False
        self._closes += 1
        if self._closes < CLOSES_BEFORE_FALLBACK:
            return False
        return self._fall_back(f"the broker closed the connection at an MQTT 5 CONNECT {self._closes} times")

    def connected(self) -> bool:
        """A connection succeeded; True the first time (when the link says which version it uses)."""
        first = not self._announced
        self._announced = True
        self.settled = True
        self._closes = 0
        return first

    def _fall_back(self, why: str) -> bool:
        if self.settled or self.version != V5:
            return False
        self.version = V311
        self.why = why
        return True


def reply_fields_from_body(payload: bytes) -> tuple[str, bytes | None] | None:
    """(response topic, correlation) from a command's JSON body, or None when it names no
    usable response topic. The fallback where no MQTT 5 properties arrived."""
    if not payload.lstrip().startswith(b"{"):
        return None
    try:
        body: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    topic = body.get("response_topic") if isinstance(body, dict) else None
    if topic is None:
        return None
    if (not isinstance(topic, str) or not topic or "+" in topic or "#" in topic or "\0" in topic
            or len(topic) > MAX_REPLY_FIELD):
        log.warning("mqtt: ignored a command's response_topic %.80r: it must be a topic name without + or # "
                    "(at most %d characters)", topic, MAX_REPLY_FIELD)
        return None
    correlation = body.get("correlation")
    if correlation is not None and (not isinstance(correlation, str) or len(correlation) > MAX_REPLY_FIELD):
        log.warning("mqtt: ignored a command's correlation: it must be a string of at most %d characters",
                    MAX_REPLY_FIELD)
        correlation = None
    return topic, None if correlation is None else correlation.encode("utf-8")
