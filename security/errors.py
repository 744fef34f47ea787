"""security/'s error hierarchy: every verdict against bytes, keys or a trust root.

Each error carries a short `code` that sync/ publishes with a failed or
rejected update state (docs/mqtt.md lists them), next to the message.
"""

from __future__ import annotations


class SecurityError(Exception):
    """Base of every error security/ raises on purpose."""

    code = "security"


class KeyStoreError(SecurityError):
    """A signing key cannot be created, read or written (permissions, format, passphrase)."""

    code = "key-store"


class TrustRootError(SecurityError):
    """A trust root (root metadata shipped to devices) is missing, unreadable or not self-signed."""

    code = "trust-root"


class RefusedError(SecurityError):
    """Something from the hub was refused: nothing of it may be installed."""


class SignatureRefused(RefusedError):
    """Metadata not signed by a threshold of the keys the trust root names (unknown key,
    too few signatures, a root rotation not signed by old and new keys)."""

    code = "signature"


class RollbackRefused(RefusedError):
    """Metadata older than what was already accepted (a rollback or replay)."""

    code = "rollback"


class ExpiredRefused(RefusedError):
    """Metadata past its expiry (a freeze: someone serves stale metadata)."""

    code = "expired"


class TargetMismatch(RefusedError):
    """A file's bytes are not the signed length or hashes (tampered, truncated, endless)."""

    code = "hash-mismatch"


class WrongLength(TargetMismatch):
    """The file is not the signed length."""

    code = "wrong-length"


class TargetTooLong(WrongLength):
    """The server sent more bytes than the signed length (endless data)."""

    code = "too-long"


class MetadataRefused(RefusedError):
    """Metadata that does not verify for another reason (malformed, inconsistent, mix-and-match)."""

    code = "metadata"


class DesiredStateRefused(RefusedError):
    """A signed desired state this device must not act on (policy, not signature)."""

    code = "desired-state"


class OtherTargetRefused(DesiredStateRefused):
    """The desired state is for another group or device."""

    code = "other-target"


class UnsafePathRefused(DesiredStateRefused):
    """A target path that could escape the model's directory (`..`, absolute, odd names)."""

    code = "unsafe-path"


class OtherReleaseRefused(DesiredStateRefused):
    """A file path that belongs to another model or version than the one named."""

    code = "other-release"


class StaleDesiredState(DesiredStateRefused):
    """A desired state whose serial is below one already accepted."""

    code = "stale-desired-state"
