"""`edgefleet keys add|list|revoke|rotate`: the API keys file (security/keys_file.py).

A secret is printed once, by `add` and `rotate`, and never stored: the file keeps its
SHA-256. `list` shows names, ids, scopes, models, expiry and limits, never a secret. Every
change rewrites the file atomically with mode 0600 under a lock of its own (the running
agent holds the state dir's lock, so two `keys` commands must not race each other), then
asks a running agent of this state dir to reload (SIGHUP), as `systemctl reload` would.
Client-certificate entries (mTLS) are added with ``--cert SUBJECT`` and named ``cert:SUBJECT``.
Bad input is one line on stderr and exit status 2; a keys file that cannot be used, 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import getpass
import json
import os
import re
import signal
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from runtime.state_lock import holder
from security.audit import append_offline
from security.identity import SCOPES, KeyLimits
from security.keys_file import (
    NAME_RE,
    CertEntry,
    KeyEntry,
    KeyFileError,
    KeysDocument,
    hash_secret,
    new_secret,
    now_utc,
    parse_time,
    read_keys_file,
    write_keys_file,
)


class KeysCliError(Exception):
    """One line for the operator, and the exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def add_keys_commands(commands: Any, add_config: Any) -> None:
    keys = commands.add_parser("keys", help="API keys with scopes and limits for the local endpoint")
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    add = sub.add_parser("add", help="make a key (its secret is printed once), or allow a client certificate")
    add_config(add)
    add.add_argument("name", nargs="?", help="the key's name (letters, digits, '.', '_', '-')")
    add.add_argument("--cert", metavar="SUBJECT", help="allow a client certificate with this subject CN "
                     "(mTLS) instead of making a secret")
    add.add_argument("--scope", action="append", default=[], metavar="SCOPE",
                     help=f"what it may call, repeatable or comma-separated: {', '.join(sorted(SCOPES))}")
    add.add_argument("--model", action="append", default=[], metavar="MODEL",
                     help="a model it may use, repeatable (default: every model)")
    add.add_argument("--expires", metavar="WHEN", help="an ISO 8601 time, or a span from now: 90d, 12h, 30m")
    add.add_argument("--rpm", type=int, metavar="N", help="requests per minute")
    add.add_argument("--tpm", type=int, metavar="N", help="tokens per minute (prompt + completion)")
    add.add_argument("--tpd", type=int, metavar="N", help="tokens per day")
    add.add_argument("--concurrent", type=int, metavar="N", help="calls in flight at once")
    listing = sub.add_parser("list", help="the keys and certificate entries (never a secret)")
    add_config(listing)
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    revoke = sub.add_parser("revoke", help="stop a key (or a cert:SUBJECT entry) from working")
    add_config(revoke)
    revoke.add_argument("name")
    rotate = sub.add_parser("rotate", help="give a key a new secret (printed once); the old one stops working")
    add_config(rotate)
    rotate.add_argument("name")


def _expiry(text: str | None) -> str | None:
    if text is None:
        return None
    span = re.fullmatch(r"(\d+)([dhm])", text.strip())
    if span:
        amount = int(span.group(1))
        delta = {"d": timedelta(days=amount), "h": timedelta(hours=amount), "m": timedelta(minutes=amount)}
        return (now_utc() + delta[span.group(2)]).replace(microsecond=0).isoformat()
    try:
        moment = parse_time(text)
    except ValueError:
        raise KeysCliError(f"--expires {text!r}: give an ISO 8601 time (2027-01-31 or 2027-01-31T12:00:00Z) "
                           "or a span like 90d, 12h, 30m") from None
    if moment <= now_utc():
        raise KeysCliError(f"--expires {text}: that time has passed")
    return moment.isoformat()


def _scopes(values: list[str]) -> list[str]:
    scopes = sorted({s.strip() for value in values for s in value.split(",") if s.strip()})
    if not scopes:
        raise KeysCliError(f"give at least one --scope ({', '.join(sorted(SCOPES))})")
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise KeysCliError(f"--scope {unknown[0]}: not a scope (scopes: {', '.join(sorted(SCOPES))})")
    return scopes


def _limits(args: argparse.Namespace) -> KeyLimits:
    for option in ("rpm", "tpm", "tpd", "concurrent"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise KeysCliError(f"--{option} must be at least 1, got {value}")
    return KeyLimits(args.rpm, args.tpm, args.tpd, args.concurrent)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Only one `keys` command changes the file at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(path: Path) -> KeysDocument:
    try:
        return read_keys_file(path) or KeysDocument()
    except KeyFileError as exc:
        raise KeysCliError(str(exc), code=1) from None


def _audit(config: AgentConfig, action: str, target: str) -> None:
    """One record in the agent's audit log (security/audit.py), as the agent's own records are."""
    if not config.audit.enabled:
        return
    try:
        append_offline(Path(config.state_dir), "local", action, target, "ok",
                       directory=config.audit.directory(config.state_dir), user=getpass.getuser())
    except OSError as exc:
        print(f"edgefleet: warning: the audit log did not take this change: {exc}", file=sys.stderr)


def _signal_agent(config: AgentConfig) -> str:
    """Ask the agent serving this state dir to reload (SIGHUP); what to tell the operator."""
    held = holder(Path(config.state_dir))
    if held is None or held[0] is None or held[1] != "serve":
        return "no agent runs on this state dir now; it reads the keys when it starts"
    try:
        os.kill(held[0], signal.SIGHUP)
    except OSError:
        return f"reload the running agent to use it: systemctl reload edgefleet (or kill -HUP {held[0]})"
    return f"the running agent (pid {held[0]}) reloads its keys now"


def _add(args: argparse.Namespace, config: AgentConfig, path: Path) -> int:
    scopes, limits, expires = _scopes(args.scope), _limits(args), _expiry(args.expires)
    models = sorted(set(args.model)) or None
    if args.cert is not None:
        if args.name is not None:
            raise KeysCliError("give a NAME or --cert SUBJECT, not both (a certificate entry is named cert:SUBJECT)")
        if not args.cert.strip() or len(args.cert) > 256:
            raise KeysCliError("--cert: the certificate's subject CN, 1-256 characters")
        with _locked(path):
            document = _read(path)
            if any(c.subject == args.cert for c in document.certs):
                raise KeysCliError(f"cert:{args.cert} exists; revoke it first to change it")
            cert = CertEntry(scopes=scopes, models=models, expires=expires, limits=limits, subject=args.cert)
            write_keys_file(path, dataclasses.replace(document, certs=[*document.certs, cert]))
            _audit(config, "keys.add", f"cert:{args.cert}")
        print(f"allowed client certificates with subject CN={args.cert}: {', '.join(scopes)}")
        print(_signal_agent(config))
        return 0
    if args.name is None:
        raise KeysCliError("give the key a NAME (or --cert SUBJECT for a client certificate)")
    if not NAME_RE.match(args.name):
        raise KeysCliError(f"name {args.name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                           "letter or digit")
    with _locked(path):
        document = _read(path)
        if document.by_name(args.name) is not None:
            raise KeysCliError(f"a key named {args.name} exists; choose another name, or rotate it")
        secret, key_id = new_secret()
        entry = KeyEntry(scopes=scopes, models=models, expires=expires, limits=limits, name=args.name, id=key_id,
                         sha256=hash_secret(secret.encode()).hex(),
                         created=now_utc().replace(microsecond=0).isoformat())
        write_keys_file(path, dataclasses.replace(document, keys=[*document.keys, entry]))
        _audit(config, "keys.add", args.name)
    print(secret)
    print(f"key {args.name} ({', '.join(scopes)}): the secret above is shown only now; keep it safe",
          file=sys.stderr)
    print(_signal_agent(config), file=sys.stderr)
    return 0


def _revoke(config: AgentConfig, path: Path, name: str) -> int:
    with _locked(path):
        document = _read(path)
        if name.startswith("cert:"):
            subject = name.removeprefix("cert:")
            certs = [c for c in document.certs if c.subject != subject]
            if len(certs) == len(document.certs):
                raise KeysCliError(f"no certificate entry {name} (see `edgefleet keys list`)")
            write_keys_file(path, dataclasses.replace(document, certs=certs))
            _audit(config, "keys.revoke", name)
        else:
            entry = document.by_name(name)
            if entry is None:
                raise KeysCliError(f"no key named {name} (see `edgefleet keys list`)")
            if entry.revoked:
                raise KeysCliError(f"the key {name} was revoked at {entry.revoked}")
            revoked = dataclasses.replace(entry, revoked=now_utc().replace(microsecond=0).isoformat())
            write_keys_file(path, dataclasses.replace(document, keys=[revoked if k is entry else k
                                                                      for k in document.keys]))
        _audit(config, "keys.revoke", name)
    print(f"revoked {name}; {_signal_agent(config)}")
    return 0


def _rotate(config: AgentConfig, path: Path, name: str) -> int:
    with _locked(path):
        document = _read(path)
        entry = document.by_name(name)
        if entry is None:
            raise KeysCliError(f"no key named {name} (see `edgefleet keys list`)")
        if entry.revoked:
            raise KeysCliError(f"the key {name} was revoked; add a new one instead")
        secret, key_id = new_secret()
        fresh = dataclasses.replace(entry, id=key_id, sha256=hash_secret(secret.encode()).hex(),
                                    created=now_utc().replace(microsecond=0).isoformat())
        write_keys_file(path, dataclasses.replace(document, keys=[fresh if k is entry else k for k in document.keys]))
        _audit(config, "keys.rotate", name)
    print(secret)
    print(f"key {name} has a new secret (above, shown only now); the old one no longer works once the agent "
          f"reloads: {_signal_agent(config)}", file=sys.stderr)
    return 0


def _rows(document: KeysDocument) -> list[dict[str, Any]]:
    now = now_utc()
    rows: list[dict[str, Any]] = []
    for key in document.keys:
        state = "revoked" if key.revoked else "expired" if key.expired(now) else "active"
        rows.append({"name": key.name, "kind": "key", "id": key.id, "state": state, "scopes": key.scopes,
                     "models": key.models, "expires": key.expires, "created": key.created,
                     "limits": {k: v for k, v in dataclasses.asdict(key.limits).items() if v is not None}})
    for cert in document.certs:
        rows.append({"name": f"cert:{cert.subject}", "kind": "cert", "id": None,
                     "state": "expired" if cert.expired(now) else "active", "scopes": cert.scopes,
                     "models": cert.models, "expires": cert.expires, "created": None,
                     "limits": {k: v for k, v in dataclasses.asdict(cert.limits).items() if v is not None}})
    return rows


def _list(path: Path, as_json: bool) -> int:
    document = _read(path)
    rows = _rows(document)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no API keys in {path} (edgefleet keys add NAME --scope infer)")
        return 0
    short = {"requests_per_minute": "rpm", "tokens_per_minute": "tpm", "tokens_per_day": "tpd",
             "concurrent": "concurrent"}
    print(f"{'NAME':24} {'ID':12} {'STATE':8} {'SCOPES':28} {'MODELS':24} {'EXPIRES':26} LIMITS")
    for r in rows:
        limits = " ".join(f"{short[k]}={v}" for k, v in r["limits"].items()) or "-"
        print(f"{r['name']:24} {r['id'] or '-':12} {r['state']:8} {','.join(r['scopes']):28} "
              f"{','.join(r['models']) if r['models'] else 'all':24} {r['expires'] or 'never':26} {limits}")
    return 0


def run_keys(args: argparse.Namespace, config: AgentConfig) -> int:
    path = config.api_keys_path()
    if args.keys_command == "add":
        return _add(args, config, path)
    if args.keys_command == "revoke":
        return _revoke(config, path, args.name)
    if args.keys_command == "rotate":
        return _rotate(config, path, args.name)
    return _list(path, args.json)

