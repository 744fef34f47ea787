"""The request gate on the HTTP side, and what every transport shares around it.

security/gate.py decides; this module feeds it and renders its answers:

- `gate_middleware` resolves each request's caller (the ``Authorization`` header, or a
  verified client certificate's subject from agent/http/peer.py), looks up the scope the
  matched route needs, checks a model named in the path, holds the call in flight for the
  key's limits, and answers refusals as OpenAI error JSON under /v1 and KServe v2
  ``{"error": …}`` under /v2 (agent/http/errors.py), with Retry-After and x-ratelimit-*;
- `check_model` and `record_usage` are for handlers that learn the model or the token
  count only from the body or the result (the OpenAI endpoints);
- `refusal_error` turns a refusal into the `ApiError` both transports render (gRPC maps it
  to UNAUTHENTICATED / PERMISSION_DENIED / RESOURCE_EXHAUSTED);
- `load_gate` reads the keys file at start (an unusable file stops the start, with why),
  `reload_keys` on SIGHUP (an unusable file keeps the keys in force, logged, and shown by
  `edgefleet doctor`);
- `gate_ctx` writes failed authentications to the audit log in summary, one record per
  source per interval, and admin calls one record each, when the app has an audit log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from agent.config import AgentConfig
from agent.context import AUDIT, METRICS
from agent.http.errors import ApiError, one_credential, to_api_error
from agent.http.peer import peer_subject
from agent.metrics import watch_gate
from security.audit import AuditLog
from security.gate import ROUTE_SCOPES, Refusal, RequestGate, scope_for
from security.identity import Identity
from security.keys_file import KeyFileError, KeysDocument, read_keys_file

log = logging.getLogger(__name__)

GATE = web.AppKey("gate", RequestGate)
IDENTITY = web.RequestKey("identity", Identity)
#: The x-ratelimit-* headers of the request's key, read when its response is prepared.
RATE_HEADERS: web.RequestKey[Callable[[], dict[str, str]]] = web.RequestKey("rate_headers")
#: How `reload_keys` starts its answer when the keys file was refused.
KEYS_KEPT = "kept the keys in force"
#: Seconds between audit records of failed authentications from one source.
FAILURE_AUDIT_INTERVAL_S = 60.0
#: admin route template -> the audit log's action
ADMIN_ACTIONS = {
    "/v2/repository/models/{name}/load": "model.load",
    "/v2/repository/models/{name}/unload": "model.unload",
    "/v2/repository/models/{name}/rollback": "model.rollback",
    "/v2/repository/models/{name}/import": "model.import",
    "/v2/repository/models/{name}": "model.remove",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _peer_subject(request: web.Request) -> str | None:
    """The verified client certificate's subject CN (mTLS), or None."""
    return peer_subject(request)


def audit_log(app: web.Application) -> AuditLog | None:
    """The app's audit log (security/audit.py), or None while ``[audit]`` is off."""
    return app.get(AUDIT)


def refusal_error(refusal: Refusal) -> ApiError:
    """The refusal as the ApiError both transports render (agent/http/errors.py maps it)."""
    return to_api_error(refusal)


def load_keys(config: AgentConfig) -> KeysDocument | None:
    """The keys file the config names (None: there is none); KeyFileError when it cannot be used."""
    return read_keys_file(config.api_keys_path())


def load_gate(config: AgentConfig) -> RequestGate:
    """The gate for a starting agent; KeyFileError (one line: file and reason) stops the start."""
    return RequestGate(load_keys(config), config.server.api_key, config.server.auth_failures_per_minute)


async def reload_keys(app: web.Application, config: AgentConfig) -> str:
    """Re-read the keys file for a reload (SIGHUP): the new keys and the config's api_key go into
    force for the next call, admitted calls go on. A file that cannot be used leaves the keys in
    force as they were, and the error is logged. Returns what happened, for the audit record
    of the reload (`edgefleet keys` records each change itself)."""
    gate = app[GATE]
    try:
        document = await asyncio.to_thread(load_keys, config)
    except KeyFileError as exc:
        log.error("API keys not reloaded, the keys in force stay: %s", exc)
        gate.configure(gate.document, config.server.api_key, config.server.auth_failures_per_minute)
        return f"{KEYS_KEPT}: {exc}"
    old = {k.name: k for k in gate.document.keys} if gate.document else {}
    new = {k.name: k for k in document.keys} if document else {}
    gate.configure(document, config.server.api_key, config.server.auth_failures_per_minute)
    changes = []
    for name, entry in new.items():
        before = old.get(name)
        if before is None:
            changes.append(("keys.add", name))
        elif entry.revoked and not before.revoked:
            changes.append(("keys.revoke", name))
        elif entry.sha256 != before.sha256:
            changes.append(("keys.rotate", name))
        elif entry != before:
            changes.append(("keys.change", name))
    changes += [("keys.remove", name) for name in old if name not in new]
    said = ", ".join(f"{action.removeprefix('keys.')} {name}" for action, name in changes)
    log.info("API keys: %d in force%s", sum(1 for k in new.values() if not k.revoked),
             f" ({said})" if said else "", extra={"api_keys": len(new)})
    return said or "unchanged"


def _source(request: web.Request) -> str:
    return request.remote or "unknown"


def identity_of(request: web.Request) -> Identity | None:
    """Who made `request` (None before the gate ran, as on a route it never reached)."""
    return request.get(IDENTITY)


def can_see_detail(request: web.Request) -> bool:
    """Whether the caller of an open route (/readyz) authenticates: paths and failure reasons are
    for them only. Nothing is counted as a failure (service managers probe without a key)."""
    values = request.headers.getall("Authorization", [])
    return request.app[GATE].peek(values[0] if len(values) == 1 else None, _peer_subject(request)) is not None


def check_model(request: web.Request, model: str) -> None:
    """Refuse (403, OpenAI's JSON) a model the caller's key may not use; for handlers that learn
    the model from the body."""
    identity = identity_of(request)
    if identity is not None:
        try:
            request.app[GATE].authorize_model(identity, model)
        except Refusal as refusal:
            raise refusal_error(refusal) from None


def record_usage(request: web.Request, prompt_tokens: int, completion_tokens: int) -> None:
    """Count what a call used against its key: /metrics and the key's token limits."""
    identity = identity_of(request)
    if identity is not None:
        request.app[GATE].record_tokens(identity, prompt_tokens, completion_tokens)


def _route(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


@web.middleware
async def gate_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every call passes here: authenticate, authorize by route, hold within the key's limits."""
    gate = request.app[GATE]
    route = _route(request)
    scope = scope_for(ROUTE_SCOPES, route) if route is not None else None
    if route is not None and scope == "public":
        return await handler(request)
    outcome = "error"
    identity: Identity | None = None
    try:
        credential = one_credential(request.headers.getall("Authorization", []))
        identity = request[IDENTITY] = gate.authenticate(credential, _peer_subject(request), _source(request))
        if route is None:  # no such path (or method): a caller who may call learns it is a 404 / 405
            return await handler(request)
        if scope is None:
            log.error("route %s has no entry in security.gate.ROUTE_SCOPES: refused", route)
        outcome = "denied"
        gate.authorize(identity, scope, request.match_info.get("name") or request.match_info.get("model"))
        assert scope is not None
        with gate.admit(identity, scope) as account:
            outcome = "error"
            if account is not None:
                request[RATE_HEADERS] = lambda: account.headers(gate.clock())
            response = await handler(request)
            outcome = "ok" if response.status < 400 else "error"
            return response
    except Refusal as refusal:
        raise refusal_error(refusal) from None
    finally:
        if identity is not None:
            _audit_admin(request, identity, outcome)


def _audit_admin(request: web.Request, identity: Identity, outcome: str) -> None:
    action = ADMIN_ACTIONS.get(_route(request) or "")
    audit = audit_log(request.app) if action else None
    if audit is not None and action is not None:
        audit.record(identity.actor, action, request.match_info.get("name", ""), outcome)


async def _rate_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: x-ratelimit-* on every answer to a limited key, streams included."""
    headers = request.get(RATE_HEADERS)
    if headers is not None:
        for name, value in headers().items():
            response.headers.setdefault(name, value)


def flush_failures(app: web.Application, older_than_s: float = FAILURE_AUDIT_INTERVAL_S) -> None:
    """Write the failed-authentication summaries due (one record per source and interval)."""
    summaries = app[GATE].take_failure_summaries(older_than_s)
    audit = audit_log(app)
    for s in summaries:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(s.reasons.items()))
        if audit is not None:
            audit.record("anonymous", "auth.failed", s.source, "denied", count=str(s.count), reasons=reasons)
        log.warning("%d failed authentication(s) from %s (%s)", s.count, s.source, reasons,
                    extra={"source": s.source, "count": s.count})


async def gate_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: failed authentications summarised every interval, and at shutdown."""
    async def loop() -> None:
        while True:
            await asyncio.sleep(FAILURE_AUDIT_INTERVAL_S / 4)
            flush_failures(app)

    task = asyncio.create_task(loop(), name="auth-failure-summaries")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    flush_failures(app, 0.0)


def setup(app: web.Application, config: AgentConfig) -> None:
    """Put the gate on `app` (before it starts): KeyFileError when the keys file cannot be used."""
    app[GATE] = load_gate(config)
    watch_gate(app[METRICS], lambda: app[GATE].counters)
    app.on_response_prepare.append(_rate_headers)
    app.cleanup_ctx.append(gate_ctx)
