"""Who a request is, and what it may do: the result of authentication, shared by every transport.

An `Identity` is what the request gate (security/gate.py) resolves from a bearer key, a
verified client certificate, the config's single ``server.api_key``, or nobody (when no
authentication is configured). Handlers and the audit log see only this, never a secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: The kinds of call a key may be allowed: chat and text generation, embeddings, KServe v2
#: tensors, operator calls (load, unload, rollback, repository index), and /metrics.
SCOPES: frozenset[str] = frozenset({"infer", "embeddings", "tensors", "admin", "metrics"})

IdentityKind = Literal["key", "cert", "local", "anonymous"]


@dataclass(frozen=True)
class KeyLimits:
    """What one key may use; None: no limit."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    concurrent: int | None = None

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "concurrent"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number of at least 1 (or left out for no limit)")

    @property
    def unlimited(self) -> bool:
        return (self.requests_per_minute is None and self.tokens_per_minute is None
                and self.tokens_per_day is None and self.concurrent is None)


NO_LIMITS = KeyLimits()


@dataclass(frozen=True)
class Identity:
    """The caller of one request."""

    #: key name, certificate subject CN, "local", "anonymous"
    name: str
    kind: IdentityKind
    scopes: frozenset[str]
    #: None: every model
    models: frozenset[str] | None = None
    limits: KeyLimits = NO_LIMITS

    @property
    def actor(self) -> str:
        """The name the audit log and /metrics use: the key's name, ``cert:<CN>``, ``local``, ``anonymous``."""
        return f"cert:{self.name}" if self.kind == "cert" else self.name

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


#: Who calls when no authentication is configured (no api_key, no keys file): everything, unlimited.
ANONYMOUS = Identity("anonymous", "anonymous", SCOPES)
#: The operator on the device (SIGHUP, the CLI), as the audit log names them.
LOCAL = Identity("local", "local", SCOPES)
