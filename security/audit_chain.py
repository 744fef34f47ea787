"""The audit log's hash chain and signed checkpoints: building records and judging lines. No I/O.

A record is one JSON line: ``{seq, at, actor, action, target, outcome, detail, prev, hash}``.
``hash`` is the SHA-256 of the record's canonical JSON without ``hash`` (keys sorted, no
spaces, UTF-8), so it covers ``prev``, the hash of the record before: editing, removing or
reordering a record breaks the chain at that record. The first record of a chain has
``prev`` = 64 zeros.

A *checkpoint* is a record like the others (action ``audit.checkpoint``) whose detail holds
``count`` (records before it) and ``head`` (the hash of the last of them), signed with the
device's Ed25519 key over `checkpoint_message`. Someone who rewrites the records and
recomputes every hash cannot sign the new head: the next checkpoint's signature fails.
Truncation is seen against a checkpoint kept elsewhere (the ``audit.checkpoint`` file beside
the log, or the hub's copy of the forwarded records): the log must reach its count.

`verify_lines` takes the lines of one or more files, oldest first, and names the first
record that is wrong. Files and keys are read by the callers (security/audit.py, the CLI).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # cryptography is imported where a key is used, not by an agent that only reads settings
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS = "0" * 64
CHECKPOINT = "audit.checkpoint"
#: the first record of a file that rotation started (it continues the chain of the one before)
ROTATED = "audit.rotated"
CHECKPOINT_SCHEMA = "edgefleet.audit-checkpoint/1"
FIELDS = ("seq", "at", "actor", "action", "target", "outcome", "detail", "prev", "hash")


def canonical(value: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8: the bytes a hash or signature is taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def record_hash(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def make_record(seq: int, at: float, actor: str, action: str, target: str, outcome: str,
                detail: Mapping[str, Any], prev: str) -> dict[str, Any]:
    record: dict[str, Any] = {"seq": seq, "at": round(at, 3), "actor": actor, "action": action, "target": target,
                              "outcome": outcome, "detail": dict(detail), "prev": prev}
    record["hash"] = record_hash(record)
    return record


def line_of(record: Mapping[str, Any]) -> bytes:
    """The record as it is written: canonical JSON and a newline."""
    return canonical(dict(record)) + b"\n"


# ---- keys and checkpoints ------------------------------------------------------------------


def public_key_text(key: Ed25519PublicKey) -> str:
    """``ed25519:<base64 of the 32 raw bytes>``: how the birth message and the CLI name it."""
    from cryptography.hazmat.primitives import serialization

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + base64.b64encode(raw).decode("ascii")


def parse_public_key(text: str) -> Ed25519PublicKey:
    """``ed25519:<base64>``, or a PEM public or private key; raises ValueError saying what is wrong."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    text = text.strip()
    if text.startswith("-----BEGIN"):
        data = text.encode("ascii")
        try:
            if "PRIVATE" in text:
                private = serialization.load_pem_private_key(data, password=None)
                if not isinstance(private, Ed25519PrivateKey):
                    raise ValueError("the PEM key is not an Ed25519 key")
                return private.public_key()
            public = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a readable PEM key: {exc}") from None
        if not isinstance(public, Ed25519PublicKey):
            raise ValueError("the PEM key is not an Ed25519 key")
        return public
    kind, _, b64 = text.partition(":")
    if kind != "ed25519" or not b64:
        raise ValueError("a public key is 'ed25519:<base64>' (the birth message's device_key) or a PEM file")
    try:
        raw = base64.b64decode(b64, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise ValueError("'ed25519:' must be followed by the base64 of 32 bytes") from None


def checkpoint_message(device: str, count: int, head: str, at: float) -> bytes:
    """What a checkpoint's signature covers (the device too: a checkpoint of one device's log
    does not verify as another's)."""
    return canonical({"schema": CHECKPOINT_SCHEMA, "device": device, "count": count, "head": head, "at": at})


def checkpoint_detail(key: Ed25519PrivateKey, device: str, count: int, head: str, at: float) -> dict[str, Any]:
    sig = key.sign(checkpoint_message(device, count, head, round(at, 3)))
    return {"device": device, "count": count, "head": head, "key": public_key_text(key.public_key()),
            "sig": base64.b64encode(sig).decode("ascii")}


def checkpoint_signature_ok(record: Mapping[str, Any], key: Ed25519PublicKey) -> bool:
    from cryptography.exceptions import InvalidSignature

    detail = record.get("detail")
    if not isinstance(detail, Mapping):
        return False
    try:
        sig = base64.b64decode(str(detail.get("sig", "")), validate=True)
        key.verify(sig, checkpoint_message(str(detail.get("device")), int(detail["count"]), str(detail["head"]),
                                           float(record["at"])))
    except (InvalidSignature, binascii.Error, KeyError, TypeError, ValueError):
        return False
    return True


# ---- verification --------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """The first thing wrong: `seq` names the record (the one edited, missing, out of place, or
    the first one truncated away)."""

    seq: int
    kind: str  # edited, removed, reordered, truncated, malformed, signature
    message: str


@dataclass
class Verdict:
    records: int = 0
    checkpoints: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head: str | None = None
    #: whether checkpoint signatures were checked (a key was given)
    signed: bool = False
    #: records after the last checkpoint: not sealed yet (fine while the agent runs)
    unsealed: int = 0
    #: identical copies skipped (`duplicates_ok`: QoS 1 may deliver a forwarded record twice)
    duplicates: int = 0
    problem: Problem | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


def parse_line(raw: bytes) -> dict[str, Any] | None:
    """A record, or None when the bytes are not one (torn, not JSON, fields missing)."""
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or any(k not in record for k in FIELDS):
        return None
    if not isinstance(record["seq"], int) or isinstance(record["seq"], bool) or record["seq"] < 1:
        return None
    if not isinstance(record["prev"], str) or not isinstance(record["hash"], str):
        return None
    return record


def verify_lines(lines: Sequence[bytes], key: Ed25519PublicKey | None = None,
                 anchor: Mapping[str, Any] | None = None, duplicates_ok: bool = False) -> Verdict:
    """Judge `lines` (each with its newline; the last may lack it) as one chain, oldest first.

    `key`: checkpoints' signatures are checked with it (else only the chain is). `anchor`: a
    checkpoint record kept apart from the log (``audit.checkpoint``, or the hub's copy): the
    log must contain the record it seals. `duplicates_ok`: an exact copy of a record already
    seen is skipped (a forwarded stream), rather than called reordered.
    """
    verdict = Verdict(signed=key is not None)
    records: list[dict[str, Any]] = []
    for index, raw in enumerate(lines):
        record = parse_line(raw) if raw.endswith(b"\n") or index < len(lines) - 1 else None
        if record is None:
            expected = records[-1]["seq"] + 1 if records else 1
            if index == len(lines) - 1 and not raw.endswith(b"\n"):
                verdict.problem = Problem(expected, "truncated", f"seq {expected} is half written: the file ends "
                                          "in the middle of a record (a torn write, or the tail was cut)")
            else:
                verdict.problem = Problem(expected, "malformed", f"line {index + 1} is not an audit record "
                                          f"(where seq {expected} belongs)")
            return _finish(verdict, records)
        records.append(record)
    seen: dict[int, str] = {}
    present = {r["seq"] for r in records}
    chain: list[dict[str, Any]] = []
    for record in records:
        seq = record["seq"]
        if seq in seen:
            if duplicates_ok and seen[seq] == record["hash"] and record_hash(record) == record["hash"]:
                verdict.duplicates += 1
                continue
            verdict.problem = Problem(seq, "reordered", f"seq {seq} appears twice or out of order")
            return _finish(verdict, chain)
        if chain:
            expected = chain[-1]["seq"] + 1
            if seq != expected:
                if seq > expected and expected in present:
                    verdict.problem = Problem(expected, "reordered", f"seq {expected} is out of place: seq {seq} "
                                              "stands where it belongs")
                elif seq > expected:
                    missing = f"seq {expected}" if seq == expected + 1 else f"seq {expected}..{seq - 1}"
                    verdict.problem = Problem(expected, "removed", f"{missing} missing: the log goes from seq "
                                              f"{expected - 1} to seq {seq}")
                else:
                    verdict.problem = Problem(seq, "reordered", f"seq {seq} is out of place (after seq "
                                              f"{expected - 1})")
                return _finish(verdict, chain)
        if record_hash(record) != record["hash"]:
            verdict.problem = Problem(seq, "edited", f"seq {seq} was edited: its content does not match its hash")
            return _finish(verdict, chain)
        if chain and record["prev"] != chain[-1]["hash"]:
            before = chain[-1]["seq"]
            verdict.problem = Problem(before, "edited", f"seq {before} was replaced: seq {seq} names another "
                                      "record before it (prev does not match)")
            return _finish(verdict, chain)
        if not chain:
            if seq == 1 and record["prev"] != GENESIS:
                verdict.problem = Problem(1, "edited", "seq 1 does not start a chain (prev is not the genesis)")
                return _finish(verdict, chain)
            if seq > 1 and record["action"] != ROTATED:
                verdict.notes.append(f"the log starts at seq {seq}, not at a rotation: earlier records were removed "
                                     "or rotated away (only an older file or the hub's copy can tell)")
        if record["action"] == CHECKPOINT:
            problem = _judge_checkpoint(record, chain, key)
            if problem is not None:
                verdict.problem = problem
                return _finish(verdict, chain)
        seen[seq] = record["hash"]
        chain.append(record)
    if anchor is not None:
        verdict.problem = _judge_anchor(anchor, chain, seen, key)
    return _finish(verdict, chain)


def _judge_checkpoint(record: Mapping[str, Any], chain: list[dict[str, Any]],
                      key: Ed25519PublicKey | None) -> Problem | None:
    seq = record["seq"]
    detail = record["detail"] if isinstance(record["detail"], Mapping) else {}
    if detail.get("count") != seq - 1 or detail.get("head") != record["prev"]:
        return Problem(seq, "edited", f"checkpoint seq {seq} does not seal the records before it")
    if key is not None and not checkpoint_signature_ok(record, key):
        since = next((r["seq"] for r in reversed(chain) if r["action"] == CHECKPOINT), 0)
        return Problem(seq, "signature", f"checkpoint seq {seq}: the signature does not verify with the device key: "
                       f"records seq {since + 1}..{seq - 1} were rewritten (and re-hashed), or the checkpoint "
                       "was forged")
    return None


def _judge_anchor(anchor: Mapping[str, Any], chain: list[dict[str, Any]], seen: Mapping[int, str],
                  key: Ed25519PublicKey | None) -> Problem | None:
    """The log against a checkpoint kept apart from it: it must hold that checkpoint."""
    seq = anchor.get("seq")
    if not isinstance(seq, int) or record_hash(anchor) != anchor.get("hash"):
        return Problem(0, "malformed", "the kept checkpoint is not a valid record")
    if key is not None and not checkpoint_signature_ok(anchor, key):
        return Problem(seq, "signature", f"the kept checkpoint (seq {seq}) is not signed by the device key")
    last = chain[-1]["seq"] if chain else 0
    if seq > last:
        return Problem(last + 1, "truncated", f"records from seq {last + 1} on were cut away: the log ends at seq "
                       f"{last}, but checkpoint seq {seq} (kept apart from the log) seals {seq - 1} records")
    if seq in seen and seen[seq] != anchor.get("hash"):
        return Problem(seq, "edited", f"seq {seq} is not the checkpoint kept apart from the log: the log was "
                       "rewritten up to it")
    return None


def _finish(verdict: Verdict, chain: list[dict[str, Any]]) -> Verdict:
    verdict.records = len(chain)
    verdict.checkpoints = sum(1 for r in chain if r["action"] == CHECKPOINT)
    if chain:
        verdict.first_seq, verdict.last_seq, verdict.head = chain[0]["seq"], chain[-1]["seq"], chain[-1]["hash"]
        last_cp = max((i for i, r in enumerate(chain) if r["action"] == CHECKPOINT), default=-1)
        verdict.unsealed = len(chain) - 1 - last_cp
    return verdict
