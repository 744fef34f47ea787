"""Checking the local API's bearer token.

Constant-time comparison, so the time a refusal takes says nothing about how
much of the key was right.
"""

from __future__ import annotations

import hmac


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def api_key_matches(expected: str, authorization: str | None) -> bool:
    """Whether the header carries `expected`. Any header, however malformed (bytes that are
    not UTF-8 arrive as surrogates), is an answer of False, never an exception."""
    token = bearer_token(authorization)
    if token is None:
        return False
    try:
        given = token.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no byte sequence decodes to
        return False
    return hmac.compare_digest(given, expected.encode("utf-8"))
