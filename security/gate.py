"""The request gate: who is calling, may they make this call, and may they make it now.

One decision for every transport. The HTTP middleware (agent/http/gate.py) and the gRPC
servicer (agent/kserve/grpc_server.py) hand it what they read from the wire (the bearer
credential, a verified certificate's subject, the source address, the route or method) and
render its refusals in their own convention: `Refusal.status` is 401, 403 or 429 and
carries the headers to send. Nothing here does I/O or knows aiohttp or grpc.

- Which scope a call needs is one table (`ROUTE_SCOPES`, `GRPC_SCOPES`) from aiohttp route
  templates and gRPC method names. A call whose route is not in it is refused, unless the
  route is marked `PUBLIC`, so a new endpoint cannot forget the check; a test walks the
  real app's routes against the table.
- Credentials are checked in constant time: every credential, however long or malformed,
  is hashed once and compared with `hmac.compare_digest` against the entry its id names
  (or a dummy) and against the config's ``server.api_key``; no path returns early on a
  partial match, and the cost does not grow with the number of keys.
- Limits are token buckets per key (requests per minute, tokens per minute, tokens per
  day) and a count of calls in flight. Tokens are debited after a call from what it used
  (usage), so a bucket may go below zero; a key whose bucket is empty is refused until it
  refills. Buckets live by key name, so a rotated key or a reload keeps its account.
- Failed authentications are counted per source: past ``failures_per_minute`` in a minute,
  that source's failures get 429 instead of 401 (a valid key from it still passes), and
  `take_failure_summaries` gives one summary per source per interval for the audit log.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .identity import ANONYMOUS, SCOPES, Identity, KeyLimits
from .keys_file import KeysDocument, hash_secret, parse_time, secret_id

#: A route anyone may call (health and readiness, as service managers probe them).
PUBLIC = "public"
#: A route any authenticated caller may call, whatever its scopes (listings, server metadata).
AUTHENTICATED = "authenticated"

#: aiohttp route template -> the scope its calls need.
ROUTE_SCOPES: dict[str, str] = {
    "/healthz": PUBLIC,
    "/readyz": PUBLIC,
    "/v2/health/live": PUBLIC,
    "/v2/health/ready": PUBLIC,
    "/metrics": "metrics",
    "/v1/models": AUTHENTICATED,
    "/v1/models/{model}": AUTHENTICATED,
    "/v1/chat/completions": "infer",
    "/v1/completions": "infer",
    "/v1/realtime": "infer",  # agent/http/websocket.py: the upgrade is checked
    "/v1/embeddings": "embeddings",
    "/v2": AUTHENTICATED,
    "/v2/models/{name}": "tensors",
    "/v2/models/{name}/versions/{version}": "tensors",
    "/v2/models/{name}/ready": "tensors",
    "/v2/models/{name}/versions/{version}/ready": "tensors",
    "/v2/models/{name}/infer": "tensors",
    "/v2/models/{name}/versions/{version}/infer": "tensors",
    "/v2/repository/index": "admin",
    "/v2/repository/models/{name}/load": "admin",
    "/v2/repository/models/{name}/unload": "admin",
    "/v2/repository/models/{name}/rollback": "admin",
    "/v2/repository/models/{name}/import": "admin",  # agent/http/models_api.py
    "/v2/repository/models/{name}": "admin",
    "/v2/repository/blobs/{sha256}": "admin",
    "/v2/repository/ps": "admin",
}
#: ``inference.GRPCInferenceService`` method -> the scope its calls need.
GRPC_SCOPES: dict[str, str] = {
    "ServerLive": PUBLIC,
    "ServerReady": PUBLIC,
    "ServerMetadata": AUTHENTICATED,
    "ModelReady": "tensors",
    "ModelMetadata": "tensors",
    "ModelInfer": "tensors",
}
#: Scopes whose calls spend tokens (and so are refused while a token bucket is empty).
TOKEN_SCOPES = frozenset({"infer", "embeddings"})
#: The identity the config's single ``server.api_key`` gives: every scope, no limits.
CONFIG_KEY_NAME = "config"
#: Sources whose failures are remembered at most (the oldest are forgotten first).
MAX_SOURCES = 10_000
FAILURE_WINDOW_S = 60.0

_DUMMY_HASH = hash_secret(b"no such key")


@dataclass(frozen=True)
class _Known:
    """One entry of the keys file as a check needs it."""

    name: str
    identity: Identity
    digest: bytes
    #: POSIX time; None: never
    expires: float | None
    revoked: bool


def _expiry(text: str | None) -> float | None:
    return parse_time(text).timestamp() if text is not None else None


@dataclass
class Refusal(Exception):
    """The gate says no: 401 (who are you?), 403 (not this), 429 (not now)."""

    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    #: for the failure counter: missing, malformed, unknown, revoked, expired
    reason: str = ""

    def __str__(self) -> str:
        return self.message


def scope_for(table: dict[str, str], route: str) -> str | None:
    """The scope `route` needs; None when the table has no entry (the gate then refuses it)."""
    return table.get(route)


class TokenBucket:
    """`capacity` tokens, refilled at `capacity / period_s` per second; may go below zero."""

    def __init__(self, capacity: int, period_s: float, now: float) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / period_s
        self.level = float(capacity)
        self.at = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def available(self, now: float) -> float:
        self._refill(now)
        return self.level

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` is available."""
        self._refill(now)
        return max(0.0, (amount - self.level) / self.rate)

    def reset_s(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        self._refill(now)
        return max(0.0, (self.capacity - self.level) / self.rate)


def duration(seconds: float) -> str:
    """A duration as OpenAI's x-ratelimit-reset-* headers write it: ``17ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{rest}s"


class KeyAccount:
    """The limits' state of one key name: its buckets and calls in flight, and its usage counts."""

    def __init__(self, limits: KeyLimits, now: float) -> None:
        self.in_flight = 0
        self.limits = limits
        self.requests: TokenBucket | None = None
        self.tokens_minute: TokenBucket | None = None
        self.tokens_day: TokenBucket | None = None
        self.apply(limits, now)

    def apply(self, limits: KeyLimits, now: float) -> None:
        """New limits (a reload): buckets whose capacity changed start full at the new one."""
        def bucket(old: TokenBucket | None, capacity: int | None, period: float) -> TokenBucket | None:
            if capacity is None:
                return None
            if old is not None and old.capacity == capacity:
                return old
            return TokenBucket(capacity, period, now)

        self.limits = limits
        self.requests = bucket(self.requests, limits.requests_per_minute, 60.0)
        self.tokens_minute = bucket(self.tokens_minute, limits.tokens_per_minute, 60.0)
        self.tokens_day = bucket(self.tokens_day, limits.tokens_per_day, 86_400.0)

    def headers(self, now: float) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the limits this key has."""
        out: dict[str, str] = {}
        if self.requests is not None:
            out["x-ratelimit-limit-requests"] = str(int(self.requests.capacity))
            out["x-ratelimit-remaining-requests"] = str(max(0, int(self.requests.available(now))))
            out["x-ratelimit-reset-requests"] = duration(self.requests.reset_s(now))
        tokens = self.tokens_minute or self.tokens_day
        if tokens is not None:
            out["x-ratelimit-limit-tokens"] = str(int(tokens.capacity))
            out["x-ratelimit-remaining-tokens"] = str(max(0, int(tokens.available(now))))
            out["x-ratelimit-reset-tokens"] = duration(tokens.reset_s(now))
        return out


@dataclass
class FailureSummary:
    """Failed authentications from one source in one interval, for one audit record."""

    source: str
    count: int
    reasons: dict[str, int]
    first: float
    last: float


@dataclass
class _Failures:
    window_start: float
    in_window: int = 0
    summary: FailureSummary | None = None


@dataclass
class GateCounters:
    """What /metrics shows (never a secret): per key name, and failed authentications."""

    requests: dict[tuple[str, str], int] = field(default_factory=dict)  # (key, outcome)
    tokens: dict[tuple[str, str], int] = field(default_factory=dict)  # (key, kind)
    failures: dict[str, int] = field(default_factory=dict)  # reason

    def count(self, table: dict[tuple[str, str], int], key: tuple[str, str], amount: int = 1) -> None:
        table[key] = table.get(key, 0) + amount


class RequestGate:
    """Authentication, scopes and limits for every transport (see the module docstring)."""

    def __init__(self, keys: KeysDocument | None, config_key: str | None, failures_per_minute: int = 30,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.failures_per_minute = failures_per_minute
        self.counters = GateCounters()
        self._accounts: dict[str, KeyAccount] = {}
        self._failures: OrderedDict[str, _Failures] = OrderedDict()
        self.configure(keys, config_key, failures_per_minute)

    # --- configuration -----------------------------------------------------------

    def configure(self, keys: KeysDocument | None, config_key: str | None,
                  failures_per_minute: int | None = None) -> None:
        """Put a (re)loaded keys file and config key in force. Calls already admitted keep going."""
        self.document = keys
        # what each check needs, worked out once per (re)load: digest, identity, expiry
        self._by_id = {entry.id: _Known(entry.name, entry.identity(), bytes.fromhex(entry.sha256),
                                        _expiry(entry.expires), entry.revoked is not None)
                       for entry in (keys.keys if keys else [])}
        self._certs = {entry.subject: _Known(entry.subject, entry.identity(), b"", _expiry(entry.expires), False)
                       for entry in (keys.certs if keys else [])}
        self._config_key = hash_secret(config_key.encode("utf-8")) if config_key else None
        if failures_per_minute is not None:
            self.failures_per_minute = failures_per_minute
        now = self.clock()
        for identity in self._identities():
            account = self._accounts.get(identity.actor)
            if account is not None:
                account.apply(identity.limits, now)

    def _identities(self) -> Iterator[Identity]:
        if self.document is not None:
            yield from (entry.identity() for entry in self.document.keys)
            yield from (entry.identity() for entry in self.document.certs)

    @property
    def required(self) -> bool:
        """Whether calls must authenticate: a config key or a keys file is in force."""
        return self._config_key is not None or self.document is not None

    # --- authentication ------------------------------------------------------------

    def authenticate(self, credential: str | None, cert_subject: str | None, source: str) -> Identity:
        """The caller of a call that sent `credential` (an Authorization value, or None) over a
        connection whose verified client certificate has `cert_subject` (or None). A bearer
        credential, when sent, is what counts. Raises Refusal 401 (or 429 for a source past
        its failure limit); every failure is counted against `source`."""
        found = self._resolve(credential, cert_subject)
        if isinstance(found, Identity):
            return found
        raise self._failed(source, *found)

    def peek(self, credential: str | None, cert_subject: str | None) -> Identity | None:
        """Who the credential names, or None; nothing is counted (for open routes that say more
        to a caller who authenticates, as /readyz does)."""
        found = self._resolve(credential, cert_subject)
        return found if isinstance(found, Identity) else None

    def _resolve(self, credential: str | None, cert_subject: str | None) -> Identity | tuple[str, str]:
        """The identity, or why not (reason, message); the same work whatever the credential."""
        if credential is None and cert_subject is not None:
            cert = self._certs.get(cert_subject)
            if cert is None:
                return "unknown", "The client certificate's subject is not allowed to call this agent"
            if cert.expires is not None and cert.expires <= time.time():
                return "expired", "The client certificate's access has expired"
            return cert.identity
        if credential is None:
            if not self.required:
                return ANONYMOUS
            return "missing", "Missing API key: send 'Authorization: Bearer <key>'"
        token = _bearer(credential)
        if token is None:  # still hashed and compared below, so a malformed header takes as long
            token = b""
        digest = hash_secret(token)
        key_id = secret_id(token)
        entry = self._by_id.get(key_id) if key_id is not None else None
        key_ok = hmac.compare_digest(digest, entry.digest if entry is not None else _DUMMY_HASH)
        config_ok = hmac.compare_digest(digest, self._config_key or _DUMMY_HASH) and self._config_key is not None
        if config_ok:
            return Identity(CONFIG_KEY_NAME, "key", SCOPES)
        if entry is not None and key_ok:
            if entry.revoked:
                return "revoked", f"The API key '{entry.name}' was revoked"
            if entry.expires is not None and entry.expires <= time.time():
                when = datetime.fromtimestamp(entry.expires, UTC).isoformat()
                return "expired", f"The API key '{entry.name}' expired at {when}"
            return entry.identity
        if not self.required:  # no authentication configured: a credential is not needed, and not checked
            return ANONYMOUS
        return ("malformed" if not token else "unknown"), "Incorrect API key provided"

    def _failed(self, source: str, reason: str, message: str) -> Refusal:
        now = self.clock()
        self.counters.failures[reason] = self.counters.failures.get(reason, 0) + 1
        record = self._failures.get(source)
        if record is None:
            record = self._failures[source] = _Failures(now)
            while len(self._failures) > MAX_SOURCES:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(source)
        if now - record.window_start >= FAILURE_WINDOW_S:
            record.window_start, record.in_window = now, 0
        record.in_window += 1
        if record.summary is None:
            record.summary = FailureSummary(source, 0, {}, now, now)
        record.summary.count += 1
        record.summary.last = now
        record.summary.reasons[reason] = record.summary.reasons.get(reason, 0) + 1
        if record.in_window > self.failures_per_minute:
            retry = max(1, math.ceil(record.window_start + FAILURE_WINDOW_S - now))
            return Refusal(429, "too_many_auth_failures", f"Too many failed authentications from {source}; "
                           f"retry in {retry}s with a valid key", {"Retry-After": str(retry)}, reason)
        return Refusal(401, "invalid_api_key", message, {"WWW-Authenticate": "Bearer"}, reason)

    def take_failure_summaries(self, older_than_s: float) -> list[FailureSummary]:
        """Summaries of sources whose first failure not yet reported is at least `older_than_s`
        old (all of them with 0): one audit record each, so a flood writes one line per interval."""
        now = self.clock()
        out = []
        for record in self._failures.values():
            if record.summary is not None and now - record.summary.first >= older_than_s:
                out.append(record.summary)
                record.summary = None
        return out

    # --- authorization and limits ----------------------------------------------

    def authorize(self, identity: Identity, scope: str | None, model: str | None = None) -> None:
        """Refusal 403 unless `identity` has `scope` (None: a route the table lacks) and may use `model`."""
        if scope is None:
            raise Refusal(403, "route_not_allowed", "No scope is defined for this call, so nobody may make it")
        if scope not in (PUBLIC, AUTHENTICATED) and scope not in identity.scopes:
            self._count(identity, "denied")
            raise Refusal(403, "insufficient_scope", f"The API key '{identity.actor}' does not have the "
                          f"'{scope}' scope this call needs (it has: {', '.join(sorted(identity.scopes))})")
        if model is not None:
            self.authorize_model(identity, model)

    def authorize_model(self, identity: Identity, model: str) -> None:
        if not identity.may_use(model):
            self._count(identity, "denied")
            raise Refusal(403, "model_not_allowed", f"The API key '{identity.actor}' may not use the model "
                          f"'{model}'", reason="model")

    def account(self, identity: Identity) -> KeyAccount | None:
        """The limits' state of `identity`; None when it has no limits."""
        if identity.limits.unlimited:
            return None
        account = self._accounts.get(identity.actor)
        if account is None:
            account = self._accounts[identity.actor] = KeyAccount(identity.limits, self.clock())
        return account

    @contextmanager
    def admit(self, identity: Identity, scope: str) -> Iterator[KeyAccount | None]:
        """Hold one call of `identity` in flight while the block runs; Refusal 429 (with
        Retry-After and x-ratelimit-* headers) when a limit says not now."""
        account = self.account(identity)
        if account is None:
            self._count(identity, "ok")
            yield None
            return
        now = self.clock()
        limits = account.limits
        if limits.concurrent is not None and account.in_flight >= limits.concurrent:
            self._limited(identity, account, "concurrency_limit_exceeded",
                          f"The API key '{identity.actor}' has {account.in_flight} calls in flight, its limit; "
                          "retry when one finishes", 1.0)
        if account.requests is not None and account.requests.available(now) < 1:
            self._limited(identity, account, "rate_limit_exceeded",
                          f"Rate limit reached for requests: the API key '{identity.actor}' may make "
                          f"{limits.requests_per_minute} requests per minute", account.requests.wait_for(1, now))
        if scope in TOKEN_SCOPES:
            for bucket, what in ((account.tokens_minute, "per minute"), (account.tokens_day, "per day")):
                if bucket is not None and bucket.available(now) <= 0:
                    self._limited(identity, account, "rate_limit_exceeded",
                                  f"Rate limit reached for tokens: the API key '{identity.actor}' may use "
                                  f"{int(bucket.capacity)} tokens {what}", bucket.wait_for(1, now))
        if account.requests is not None:
            account.requests.take(1, now)
        self._count(identity, "ok")
        account.in_flight += 1
        try:
            yield account
        finally:
            account.in_flight -= 1

    def _limited(self, identity: Identity, account: KeyAccount, code: str, message: str, wait_s: float) -> None:
        self._count(identity, "rate_limited")
        headers = account.headers(self.clock())
        headers["Retry-After"] = str(max(1, math.ceil(wait_s)))
        raise Refusal(429, code, message, headers)

    def record_tokens(self, identity: Identity, prompt: int, completion: int) -> None:
        """What a call used, after it: counted in /metrics and debited from its token buckets."""
        if identity.kind == "anonymous":  # no keys configured: the per-model figures say it all
            return
        actor = identity.actor
        if prompt:
            self.counters.count(self.counters.tokens, (actor, "prompt"), prompt)
        if completion:
            self.counters.count(self.counters.tokens, (actor, "completion"), completion)
        account = self.account(identity)
        if account is None:
            return
        now = self.clock()
        for bucket in (account.tokens_minute, account.tokens_day):
            if bucket is not None:
                bucket.take(prompt + completion, now)

    def _count(self, identity: Identity, outcome: str) -> None:
        if identity.kind != "anonymous":
            self.counters.count(self.counters.requests, (identity.actor, outcome))


def _bearer(credential: str) -> bytes | None:
    """The bytes of an ``Authorization: Bearer <token>`` value, or None. Header bytes that are
    not UTF-8 arrive as surrogates (aiohttp) and go back to their bytes; no value raises."""
    scheme, _, token = credential.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    try:
        return token.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no byte sequence decodes to
        return None
