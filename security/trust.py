"""Trust roots: the root metadata a device is provisioned with, and root rotation.

A device trusts exactly one thing at first: a root metadata file (TUF's root
role: the keys and thresholds of every role), copied to it at provisioning
(``updates.trust_root`` in agent.toml). Everything else it accepts follows from
that root by python-tuf's client workflow. A new root (new keys, new thresholds)
is accepted only when signed by a threshold of the previous root's keys *and* a
threshold of its own, so a stolen key alone cannot take a fleet over and a lost
one can be replaced in-band.

Pure functions over metadata objects and bytes; no files, no network.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import Metadata, Root

from .errors import SignatureRefused, TrustRootError

TOP_LEVEL_ROLES = ("root", "targets", "snapshot", "timestamp")


def parse_trust_root(data: bytes) -> Metadata[Root]:
    """Root metadata a device may start from: well-formed and signed by its own threshold."""
    try:
        root = Metadata[Root].from_bytes(data)
    except (RepositoryError, ValueError, TypeError, KeyError) as exc:
        raise TrustRootError(f"not TUF root metadata: {exc}") from None
    if not isinstance(root.signed, Root):
        raise TrustRootError(f"not root metadata but {root.signed.type}")
    result = root.signed.get_verification_result(Root.type, root.signed_bytes, root.signatures)
    if not result:
        raise TrustRootError(
            f"root v{root.signed.version} is signed by {len(result.signed)} of the {result.threshold} keys it needs"
        )
    return root


def new_root(keys: Mapping[str, Sequence[Key]], thresholds: Mapping[str, int], expires: datetime) -> Metadata[Root]:
    """Version 1 of a repository's root: `keys` and `thresholds` for each top-level role."""
    root = Root(expires=expires, consistent_snapshot=True)
    for role in TOP_LEVEL_ROLES:
        role_keys = list(keys.get(role, ()))
        threshold = thresholds.get(role, 1)
        if threshold < 1 or threshold > len(role_keys):
            raise TrustRootError(f"role {role}: threshold {threshold} needs 1..{len(role_keys)} keys")
        for key in role_keys:
            root.add_key(key, role)
        root.roles[role].threshold = threshold
    return Metadata(root)


def sign_root(root: Metadata[Root], signers: Iterable[Signer], previous: Root | None) -> Metadata[Root]:
    """Sign `root` with every signer given, then check the result is acceptable to a client
    that trusts `previous` (None for version 1): a threshold of old and of new keys."""
    root.signatures.clear()
    for signer in signers:
        root.sign(signer, append=True)
    result = root.signed.get_root_verification_result(previous, root.signed_bytes, root.signatures)
    if not result:
        parts = [
            f"{len(r.signed)}/{r.threshold} of the {label} root keys"
            for label, r in (("previous", result.first), ("new", result.second))
            if not r
        ]
        raise SignatureRefused(f"root v{root.signed.version} would be refused: signed by only {', '.join(parts)}")
    return root


def rotated(
    current: Root,
    role: str,
    add: Sequence[Key],
    revoke: Sequence[str],
    expires: datetime,
    threshold: int | None = None,
) -> Metadata[Root]:
    """The next root version with keys of `role` added and revoked (not yet signed)."""
    if role not in TOP_LEVEL_ROLES:
        raise TrustRootError(f"unknown role {role!r}")
    signed = Root.from_dict(copy.deepcopy(current.to_dict()))  # to_dict shares the roles' key lists
    signed.version = current.version + 1
    signed.expires = expires
    for key in add:
        signed.add_key(key, role)
    for keyid in revoke:
        if keyid not in signed.roles[role].keyids:
            raise TrustRootError(f"key {keyid[:16]}… does not sign for {role}")
        signed.revoke_key(keyid, role)
    if threshold is not None:
        signed.roles[role].threshold = threshold
    if not 1 <= signed.roles[role].threshold <= len(signed.roles[role].keyids):
        raise TrustRootError(
            f"role {role} would have {len(signed.roles[role].keyids)} key(s) for a threshold of "
            f"{signed.roles[role].threshold}"
        )
    return Metadata(signed)
