"""`edgefleet audit verify` and `edgefleet hub audit verify`: is the audit log what was written?

    edgefleet audit verify [FILE…]      this device's log (default: every file of <state_dir>/audit,
                                        oldest first, against audit.checkpoint and device-key.pem)
    edgefleet hub audit verify --device ID FILE
                                        a device's forwarded records (captured from
                                        {prefix}/devices/ID/audit, one payload a line), with the
                                        public key from its retained birth message

Both print one line: ``ok: …`` and exit 0, or ``tampered: seq N (kind): …`` naming the
first record that was edited, removed, reordered or truncated away, and exit 1. A file or
key that cannot be read is one line and exit 2. The judging is security/audit_chain.py's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from security.audit import CHECKPOINT_NAME, KEY_NAME, LOG_NAME, AuditSettings
from security.audit_chain import Verdict, parse_line, parse_public_key, public_key_text, verify_lines

if TYPE_CHECKING:  # cryptography: loaded when a key is read (security/audit_chain.py), not with the parser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


class AuditCliError(Exception):
    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def add_audit_arguments(verify: argparse.ArgumentParser) -> None:
    verify.add_argument("--public-key", metavar="KEY",
                        help="ed25519:<base64> (the birth message's device_key) or a PEM file (default: the "
                             "state dir's device-key.pem)")
    verify.add_argument("--checkpoint", type=Path, metavar="FILE",
                        help="a checkpoint kept apart from the log (default: audit.checkpoint beside it): the log "
                             "must reach it")
    verify.add_argument("--json", action="store_true", help="the verdict as JSON")


def log_files(directory: Path) -> list[Path]:
    """audit.log.N … audit.log.1, audit.log: oldest first."""
    rotated = sorted((p for p in directory.glob(f"{LOG_NAME}.*") if p.suffix[1:].isdigit()),
                     key=lambda p: int(p.suffix[1:]), reverse=True)
    current = directory / LOG_NAME
    return [*rotated, *([current] if current.exists() else [])]


def read_key(text: str | None, default: Path | None) -> Ed25519PublicKey | None:
    """--public-key (text or a file), else `default` (a PEM file) when it exists, else None."""
    if text is None:
        if default is None or not default.exists():
            return None
        text = str(default)
    if not text.startswith("ed25519:"):
        try:
            text = Path(text).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise AuditCliError(f"public key {text}: cannot read it ({reason})") from None
    try:
        return parse_public_key(text)
    except ValueError as exc:
        raise AuditCliError(f"public key: {exc}") from None


def read_lines(files: list[Path]) -> list[bytes]:
    lines: list[bytes] = []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise AuditCliError(f"{path}: cannot read it ({exc.strerror})") from None
        lines += data.splitlines(keepends=True)
    return lines


def read_anchor(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    try:
        anchor = parse_line(path.read_bytes())
    except OSError as exc:
        raise AuditCliError(f"{path}: cannot read it ({exc.strerror})") from None
    if anchor is None:
        raise AuditCliError(f"{path}: not a checkpoint record")
    return anchor


def report(verdict: Verdict, key: Ed25519PublicKey | None, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"ok": verdict.ok, "records": verdict.records, "checkpoints": verdict.checkpoints,
                          "first_seq": verdict.first_seq, "last_seq": verdict.last_seq, "head": verdict.head,
                          "signed": verdict.signed, "unsealed": verdict.unsealed, "duplicates": verdict.duplicates,
                          "notes": verdict.notes,
                          "problem": None if verdict.problem is None else vars(verdict.problem)}))
        return 0 if verdict.ok else 1
    if verdict.problem is not None:
        problem = verdict.problem
        print(f"tampered: seq {problem.seq} ({problem.kind}): {problem.message}")
        return 1
    if not verdict.records:
        print("ok: the log is empty")
        return 0
    signed = (f"signed by {public_key_text(key)}" if key is not None
              else "signatures NOT checked (no device key: give --public-key)")
    print(f"ok: seq {verdict.first_seq}..{verdict.last_seq}, {verdict.records} records, {verdict.checkpoints} "
          f"checkpoints {signed}; {verdict.unsealed} after the last checkpoint"
          + (f"; {verdict.duplicates} duplicates skipped" if verdict.duplicates else ""))
    for note in verdict.notes:
        print(f"note: {note}")
    return 0


def verify_command(args: argparse.Namespace, state_dir: Path, settings: AuditSettings) -> int:
    """`edgefleet audit verify [FILE…]`."""
    directory = settings.directory(state_dir)
    files = [Path(f) for f in args.files] if args.files else log_files(directory)
    if not files:
        raise AuditCliError(f"no audit log in {directory} (is [audit] on, and is this the agent's state dir?)")
    key = read_key(args.public_key, state_dir / KEY_NAME)
    anchor = read_anchor(args.checkpoint or files[-1].parent / CHECKPOINT_NAME)
    return report(verify_lines(read_lines(files), key, anchor), key, args.json)


def hub_verify_command(args: argparse.Namespace, broker: Any) -> int:
    """`edgefleet hub audit verify --device ID FILE`: forwarded records (duplicates from QoS 1
    redelivery are skipped), with the key from the device's retained birth message unless given."""
    text = args.public_key
    if text is None:
        from sync.hub.mqtt_tools import read_retained

        state = read_retained(broker, [f"{args.topic_prefix}/devices/{args.device}/state"], args.wait)
        body = next(iter(state.values()), None)
        text = body.get("device_key") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise AuditCliError(f"device {args.device}: no device_key in its retained state on "
                                f"{broker.host}:{broker.port} (give --public-key)")
    key = read_key(text, None)
    anchor = read_anchor(args.checkpoint)
    verdict = verify_lines(read_lines([Path(args.file)]), key, anchor, duplicates_ok=True)
    return report(verdict, key, args.json)


def run(fn: Any, *args: Any) -> int:
    try:
        return int(fn(*args))
    except AuditCliError as exc:
        print(f"edgefleet: {exc}", file=sys.stderr)
        return exc.code
