"""python-tuf's exceptions turned into security/'s verdicts, in one place.

ngclient raises precise errors (`UnsignedMetadataError`, `BadVersionNumberError`,
`ExpiredMetadataError`, `LengthOrHashMismatchError`, …); sync/ wants one of our
`RefusedError`s with a reason code it can publish. Anything that is not a
verdict on the bytes (the hub is down, a socket timed out) is left to the caller.
"""

from __future__ import annotations

from tuf.api import exceptions as tuf_errors

from .errors import (
    ExpiredRefused,
    MetadataRefused,
    RefusedError,
    RollbackRefused,
    SignatureRefused,
    TargetMismatch,
    TargetTooLong,
)


def verdict(exc: BaseException) -> RefusedError | None:
    """The verdict a python-tuf exception stands for, or None when it is not one (network)."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, tuf_errors.UnsignedMetadataError):
        return SignatureRefused(f"metadata not signed by a threshold of trusted keys: {message}")
    if isinstance(exc, tuf_errors.BadVersionNumberError):
        return RollbackRefused(f"metadata older than what this device accepted: {message}")
    if isinstance(exc, tuf_errors.ExpiredMetadataError):
        return ExpiredRefused(f"metadata expired: {message}")
    if isinstance(exc, tuf_errors.LengthOrHashMismatchError):
        return TargetMismatch(f"bytes do not match the signed length and hashes: {message}")
    if isinstance(exc, tuf_errors.DownloadLengthMismatchError):
        return TargetTooLong(f"the server sent more than the signed length: {message}")
    if isinstance(exc, tuf_errors.RepositoryError):
        return MetadataRefused(f"metadata refused: {message}")
    return None
