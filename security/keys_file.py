"""The API keys file: named keys with scopes, models, expiry and limits, stored hashed.

Not to be confused with security/keys.py (the hub's signing keys). This module reads and
writes ``<state_dir>/api-keys.json`` (or ``server.api_keys_file``), which `edgefleet keys`
manages and the agent reads at start and on every SIGHUP::

    {"version": 1,
     "keys":  [{"name": "billing", "id": "3f9a1c0b7d2e", "sha256": "…", "scopes": ["infer"],
                "models": ["smollm2-135m-instruct"], "expires": "2027-01-01T00:00:00+00:00",
                "limits": {"requests_per_minute": 60, "tokens_per_minute": 20000}}],
     "certs": [{"subject": "sensor-service", "scopes": ["tensors"]}]}

Why a hash and not a password hash: a secret is 256 random bits made by `new_secret`
(``efk_<id>_<token_urlsafe(32)>``, recognisable as GitHub's ``ghp_`` and Stripe's ``sk_``
tokens are), so nobody can guess it and one SHA-256 is what it needs, checked in constant
time. The id in the secret finds its entry without trying every key, so the cost of a check
does not grow with the number of keys. A ``certs`` entry gives the same scopes and limits to
a client certificate whose verified subject CN matches (mTLS: a service on the device calls
without a bearer secret).

The file must be the owner's only (0600, as ssh insists for its keys): a group- or
world-readable one is refused with the fix in the message. Parsing is from bytes
(`parse_keys`), reading and writing are `read_keys_file` / `write_keys_file`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runtime.files import write_file_atomic
from runtime.structured import SchemaError, from_mapping

from .identity import SCOPES, Identity, KeyLimits

SECRET_PREFIX = "efk_"
ID_LENGTH = 12
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SECRET_RE = re.compile(r"^efk_([0-9a-f]{12})_[A-Za-z0-9_-]{43}$")
FILE_MODE = 0o600


class KeyFileError(Exception):
    """The keys file cannot be used; the message names the file and says why and what to do."""


def _check_scopes(scopes: list[str]) -> None:
    unknown = sorted(set(scopes) - SCOPES)
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r} (scopes: {', '.join(sorted(SCOPES))})")
    if not scopes:
        raise ValueError(f"at least one scope is needed ({', '.join(sorted(SCOPES))})")


def parse_time(text: str) -> datetime:
    """An ISO 8601 time; one without a zone is UTC."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Grant:
    """What a key or a certificate may do (the fields both entries share)."""

    scopes: list[str]
    #: None: every model
    models: list[str] | None = None
    #: ISO 8601; None: never expires
    expires: str | None = None
    limits: KeyLimits = field(default_factory=KeyLimits)

    def __post_init__(self) -> None:
        _check_scopes(self.scopes)
        if self.expires is not None:
            try:
                parse_time(self.expires)
            except ValueError:
                raise ValueError(f"expires: not an ISO 8601 time: {self.expires!r}") from None

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and parse_time(self.expires) <= now


@dataclass(frozen=True)
class KeyEntry(Grant):
    name: str = ""
    #: the 12 hex characters after ``efk_`` in the secret
    id: str = ""
    #: hex SHA-256 of the whole secret
    sha256: str = ""
    created: str | None = None
    #: when it was revoked (kept so that `keys list` shows it); None: in force
    revoked: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not NAME_RE.match(self.name):
            raise ValueError(f"name {self.name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        if not re.fullmatch(r"[0-9a-f]{12}", self.id):
            raise ValueError(f"key {self.name}: id must be 12 hex characters")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"key {self.name}: sha256 must be 64 hex characters")

    def identity(self) -> Identity:
        return Identity(self.name, "key", frozenset(self.scopes),
                        None if self.models is None else frozenset(self.models), self.limits)


@dataclass(frozen=True)
class CertEntry(Grant):
    #: the client certificate's subject common name (CN), as verified against server's CA
    subject: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.subject or len(self.subject) > 256:
            raise ValueError("subject: the certificate's CN, 1-256 characters")

    def identity(self) -> Identity:
        return Identity(self.subject, "cert", frozenset(self.scopes),
                        None if self.models is None else frozenset(self.models), self.limits)


@dataclass(frozen=True)
class KeysDocument:
    version: int = 1
    keys: list[KeyEntry] = field(default_factory=list)
    certs: list[CertEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.version != 1:
            raise ValueError(f"version {self.version} is not known (this agent reads version 1)")
        for what, values in (("key name", [k.name for k in self.keys]), ("key id", [k.id for k in self.keys]),
                             ("cert subject", [c.subject for c in self.certs])):
            duplicates = sorted({v for v in values if values.count(v) > 1})
            if duplicates:
                raise ValueError(f"{what} {duplicates[0]!r} is listed twice")

    def by_name(self, name: str) -> KeyEntry | None:
        return next((k for k in self.keys if k.name == name), None)


def hash_secret(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def new_secret() -> tuple[str, str]:
    """A fresh secret and its id: ``efk_<12 hex>_<43 url-safe characters>`` (256 random bits)."""
    key_id = secrets.token_hex(ID_LENGTH // 2)
    return f"{SECRET_PREFIX}{key_id}_{secrets.token_urlsafe(32)}", key_id


def secret_id(token: bytes) -> str | None:
    """The id a well-formed secret carries, or None for anything else (no exception, whatever the bytes)."""
    try:
        match = _SECRET_RE.match(token.decode("ascii"))
    except UnicodeDecodeError:
        return None
    return match.group(1) if match else None


def parse_keys(data: bytes, source: str = "api keys file") -> KeysDocument:
    """The document in `data`; KeyFileError naming the entry and the field that is wrong."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise KeyFileError(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise KeyFileError(f"{source}: expected a JSON object with \"keys\" and \"certs\"")
    try:
        return from_mapping(KeysDocument, raw)
    except SchemaError as exc:
        raise KeyFileError(f"{source}: {exc}") from None


def read_keys_file(path: Path) -> KeysDocument | None:
    """The keys in `path`; None when there is no such file (no keys configured). A file that
    others may read, or that cannot be read or parsed, is a KeyFileError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read it: {exc.strerror} (run as the agent's user, "
                           "and keep the file owned by it)") from None
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise KeyFileError(f"{path}: not a regular file")
        if mode & 0o077:
            raise KeyFileError(f"{path}: mode {stat.S_IMODE(mode):04o} lets others read the key hashes; "
                               f"it must be 0600 (chmod 600 {path})")
        try:
            data = handle.read()
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot read it: {exc.strerror}") from None
    return parse_keys(data, str(path))


def _clean(value: Any) -> Any:
    """The document as JSON, leaving out what is unset (None) so the file stays short."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


_FIRST = ("name", "subject", "id", "scopes", "models")


def dump_keys(document: KeysDocument) -> bytes:
    raw = _clean(asdict(document))
    for part in ("keys", "certs"):  # who first, then what: easier to read
        raw[part] = [{**{k: e[k] for k in _FIRST if k in e}, **e} for e in raw[part]]
    return (json.dumps(raw, indent=2) + "\n").encode("utf-8")


def write_keys_file(path: Path, document: KeysDocument) -> None:
    """Write atomically (a crash leaves the old file or the new one), mode 0600; when root writes
    it, it goes to the owner of its directory (the agent's user), who must read it."""
    write_file_atomic(path, dump_keys(document), mode=FILE_MODE)
    if os.geteuid() == 0:
        owner = path.parent.stat()
        if owner.st_uid != 0:
            os.chown(path, owner.st_uid, owner.st_gid)


def now_utc() -> datetime:
    return datetime.now(UTC)
