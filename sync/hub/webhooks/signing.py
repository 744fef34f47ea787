"""The signature on every webhook post: HMAC-SHA256 over the timestamp and the body.

    X-Edgefleet-Timestamp: 1767225600
    X-Edgefleet-Signature-256: sha256=<hex HMAC-SHA256(key, b"1767225600." + body)>

GitHub's ``X-Hub-Signature-256`` format (``sha256=`` + hex), with the timestamp bound in as
Stripe does: a receiver that refuses timestamps older than a few minutes cannot be fed an
old body again, and the timestamp cannot be changed without the key. The timestamp is the
time of the attempt (a retry is signed afresh); the body, and its ``id``, stay the same.
The standard library's `hmac` does the work; `verify` compares in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

SIGNATURE_HEADER = "X-Edgefleet-Signature-256"
TIMESTAMP_HEADER = "X-Edgefleet-Timestamp"
EVENT_HEADER = "X-Edgefleet-Event"
DELIVERY_HEADER = "X-Edgefleet-Delivery"
#: how old a timestamp `verify` accepts by default, either way (clock skew)
TOLERANCE_S = 300


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The header value: ``sha256=`` + hex HMAC-SHA256 of ``b"<timestamp>." + body``."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def headers(secret: bytes, event: str, delivery: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """Every header of one attempt to post `body`."""
    timestamp = int(time.time() if now is None else now)
    return {
        "Content-Type": "application/json",
        EVENT_HEADER: event,
        DELIVERY_HEADER: delivery,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, timestamp, body),
    }


def verify(secret: bytes, received: Mapping[str, str], body: bytes, now: float | None = None,
           tolerance_s: float = TOLERANCE_S) -> bool:
    """What a receiver checks (the Python snippet in docs/operations.md does the same): the
    signature over this timestamp and these bytes, and a timestamp within `tolerance_s`."""
    try:
        timestamp = int(received[TIMESTAMP_HEADER])
        given = received[SIGNATURE_HEADER]
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), given)
