"""The hub's TUF repository on disk: metadata, target files and the keys that sign them.

```
<hub_dir>/
  hub.json                 expiry periods (and where the hub is reached), written by `hub init`
  keys/                    0700; one 0600 PEM per key (security/keys.py)
  trust-root.json          the root to provision devices with (latest root version)
  repository/              what `hub serve` (or any static HTTP server, CDN, S3 bucket) serves
    metadata/              N.root.json, N.targets.json, N.snapshot.json, timestamp.json
    targets/               models/<name>/<version>/<sha256>.<file>, desired/…/<sha256>.<x>.json
```

Built on python-tuf's `Repository` (the abstraction its examples/repository
uses): `open` reads a role's newest metadata, `close` bumps its version, sets its
expiry from the hub's clock, signs it with every key of the role the key store
holds and refuses to write metadata a client would not accept. Consistent
snapshots are on, so metadata and target files are never overwritten: a client
mid-download always sees one coherent release. The clock is injectable, so tests
sign metadata that has already expired without waiting.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer
from tuf.repository import Repository

from runtime.files import write_file_atomic as write_atomic
from security.errors import SecurityError, SignatureRefused
from security.keys import KeyStore
from security.trust import TOP_LEVEL_ROLES, new_root, rotated, sign_root

from ..errors import HubError

Clock = Callable[[], datetime]
SERIALIZER = JSONSerializer(compact=False)


def utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass
class HubSettings:
    """hub.json: how long each role's metadata stays valid (days)."""

    expiry_days: dict[str, float] = field(
        default_factory=lambda: {"root": 365.0, "targets": 90.0, "snapshot": 7.0, "timestamp": 1.0}
    )
    #: `hub refresh` re-signs a role when less than this share of its period is left.
    refresh_when_left: float = 0.5

    @classmethod
    def load(cls, path: Path) -> HubSettings:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise HubError(
                f"{path.parent} is not a hub (no hub.json): run `edgefleet hub init --hub {path.parent}`, "
                f"or give the hub's directory with --hub"
            ) from None
        except (OSError, ValueError) as exc:
            raise HubError(f"{path}: unreadable ({exc})") from None
        settings = cls()
        settings.expiry_days.update({k: float(v) for k, v in data.get("expiry_days", {}).items()})
        settings.refresh_when_left = float(data.get("refresh_when_left", settings.refresh_when_left))
        return settings


class HubRepository(Repository):
    """One hub directory; every method leaves it consistent on disk."""

    def __init__(self, hub_dir: Path | str, clock: Clock = utc_now, keys: KeyStore | None = None) -> None:
        self.dir = Path(hub_dir)
        self.clock = clock
        self.keys = keys or KeyStore(self.dir / "keys")
        self.metadata_dir = self.dir / "repository" / "metadata"
        self.targets_dir = self.dir / "repository" / "targets"
        self._settings: HubSettings | None = None

    @property
    def settings(self) -> HubSettings:
        if self._settings is None:
            self._settings = HubSettings.load(self.dir / "hub.json")
        return self._settings

    # ---- creating a hub ------------------------------------------------------------

    @classmethod
    def create(
        cls,
        hub_dir: Path | str,
        key_counts: dict[str, int] | None = None,
        thresholds: dict[str, int] | None = None,
        settings: HubSettings | None = None,
        clock: Clock = utc_now,
    ) -> HubRepository:
        """A new repository: keys for every role, root v1, empty targets, snapshot, timestamp."""
        hub_dir = Path(hub_dir)
        if (hub_dir / "hub.json").exists():
            raise HubError(f"{hub_dir} is already a hub")
        counts = {role: 1 for role in TOP_LEVEL_ROLES} | (key_counts or {})
        wanted = {role: 1 for role in TOP_LEVEL_ROLES} | (thresholds or {})
        for role in TOP_LEVEL_ROLES:
            counts[role] = max(counts[role], wanted[role])
        settings = settings or HubSettings()
        hub_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(hub_dir / "hub.json", json.dumps(asdict(settings), indent=1).encode())
        repo = cls(hub_dir, clock=clock)
        repo._settings = settings
        generated = {role: [repo.keys.generate(role) for _ in range(counts[role])] for role in TOP_LEVEL_ROLES}
        root = new_root({r: [k.public_key for k in ks] for r, ks in generated.items()}, wanted, repo._expiry(Root.type))
        sign_root(root, [k.signer for k in generated["root"]], previous=None)
        repo._write(Root.type, root)
        for role in ("targets", "snapshot", "timestamp"):
            with repo.edit(role):
                pass
        return repo

    # ---- python-tuf Repository ---------------------------------------------------------

    def open(self, role: str) -> Metadata:
        path = self._latest_path(role)
        if path is None:
            signed = {Root.type: Root, Snapshot.type: Snapshot, Timestamp.type: Timestamp}.get(role, Targets)()
            md = Metadata(signed)
            md.signed.version = 0
            return md
        try:
            return Metadata.from_file(str(path))
        except (OSError, ValueError) as exc:
            raise HubError(f"{path}: unreadable metadata ({exc})") from None

    def close(self, role: str, md: Metadata) -> None:
        md.signed.version += 1
        md.signed.expires = self._expiry(role)
        self.sign_and_write(role, md)

    def sign_and_write(self, role: str, md: Metadata, signers: Sequence[Signer] | None = None) -> None:
        """Sign `md` with `signers` (default: every key of the role the store holds), check a
        client would accept it, write it."""
        root = md.signed if role == Root.type else self.root()
        keyids = root.roles[role].keyids
        if signers is None:
            try:
                signers = list(self.keys.signers_for(role, keyids))
            except SecurityError as exc:
                raise HubError(str(exc)) from None
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        result = root.get_verification_result(role, md.signed_bytes, md.signatures)
        if not result:
            raise SignatureRefused(
                f"{role} v{md.signed.version} signed by {len(result.signed)} of the {result.threshold} keys it "
                f"needs; the keys missing from {self.keys.directory} are "
                + ", ".join(k[:16] for k in keyids if k not in result.signed)
            )
        self._write(role, md)

    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        return {"targets.json": MetaFile(version=self.targets().version)}

    @property
    def snapshot_info(self) -> MetaFile:
        return MetaFile(version=self.snapshot().version)

    # ---- files ------------------------------------------------------------------------

    def _latest_path(self, role: str) -> Path | None:
        if role == Timestamp.type:
            path = self.metadata_dir / "timestamp.json"
            return path if path.exists() else None
        versions = [
            int(p.name.split(".", 1)[0])
            for p in self.metadata_dir.glob(f"*.{role}.json")
            if p.name.split(".", 1)[0].isdigit()
        ]
        return self.metadata_dir / f"{max(versions)}.{role}.json" if versions else None

    def _write(self, role: str, md: Metadata) -> None:
        name = "timestamp.json" if role == Timestamp.type else f"{md.signed.version}.{role}.json"
        write_atomic(self.metadata_dir / name, md.to_bytes(SERIALIZER))
        if role == Root.type:
            write_atomic(self.dir / "trust-root.json", md.to_bytes(SERIALIZER))

    def _expiry(self, role: str) -> datetime:
        return self.clock() + timedelta(days=self.settings.expiry_days[role])

    def add_target_file(self, target_path: str, source: Path) -> TargetFile:
        """Copy (or hard-link) `source` in as `target_path`, named by hash (consistent snapshots)."""
        info = TargetFile.from_file(target_path, str(source), ["sha256"])
        directory, _, base = target_path.rpartition("/")
        stored = self.targets_dir / directory / f"{info.hashes['sha256']}.{base}"
        if not stored.exists():
            # a copy, not a link: editing the bundle afterwards must not change what was signed
            stored.parent.mkdir(parents=True, exist_ok=True)
            temp = stored.with_name(f".{stored.name}.{os.getpid()}.tmp")
            shutil.copyfile(source, temp)
            os.replace(temp, stored)
        return info

    def add_target_bytes(self, target_path: str, data: bytes) -> TargetFile:
        info = TargetFile.from_data(target_path, data, ["sha256"])
        directory, _, base = target_path.rpartition("/")
        stored = self.targets_dir / directory / f"{info.hashes['sha256']}.{base}"
        if not stored.exists():
            write_atomic(stored, data)
        return info

    def read_target(self, target_path: str) -> bytes | None:
        """The bytes of a target the current targets metadata lists, or None."""
        info = self.targets().targets.get(target_path)
        if info is None:
            return None
        directory, _, base = target_path.rpartition("/")
        return (self.targets_dir / directory / f"{info.hashes['sha256']}.{base}").read_bytes()

    def target_file_path(self, target_path: str) -> Path:
        info = self.targets().targets[target_path]
        directory, _, base = target_path.rpartition("/")
        return self.targets_dir / directory / f"{info.hashes['sha256']}.{base}"

    def publish_targets(self, files: dict[str, TargetFile]) -> int:
        """Add `files` to targets metadata, then new snapshot and timestamp; returns the
        targets version."""
        with self.edit_targets() as targets:
            targets.targets.update(files)
        self.do_snapshot()
        self.do_timestamp()
        return self.targets().version

    def rotate_key(
        self, role: str, revoke: Sequence[str] | None = None, count: int | None = None
    ) -> tuple[list[str], list[str]]:
        """Replace keys of `role`: `count` new keys in, `revoke` (default: all the role's current
        keys) out. The new root is signed by a threshold of the old root keys and of the new
        ones; the role's own metadata is re-signed with its new keys. Returns (added, revoked)."""
        root_md = self.open(Root.type)
        current = root_md.signed
        old_root_keyids = list(current.roles["root"].keyids)
        revoke = list(current.roles[role].keyids) if revoke is None else list(revoke)
        added = [self.keys.generate(role) for _ in range(len(revoke) if count is None else count)]
        try:
            new_md = rotated(current, role, [k.public_key for k in added], revoke, self._expiry(Root.type))
            keyids = set(old_root_keyids) | set(new_md.signed.roles["root"].keyids)
            signers = self.keys.signers_for("root", sorted(keyids))
            sign_root(new_md, signers, previous=current)
        except SecurityError:
            for key in added:
                key.path.unlink(missing_ok=True)
            raise
        self._write(Root.type, new_md)
        if role == "targets":
            with self.edit_targets():
                pass
        if role in ("targets", "snapshot"):
            self.do_snapshot(force=True)
        self.do_timestamp(force=True)
        for keyid in revoke:
            with contextlib.suppress(SecurityError):
                self.keys.remove(keyid)
        return [k.keyid for k in added], revoke

    def expiring(self) -> dict[str, datetime]:
        """Roles whose metadata expires within `refresh_when_left` of their period."""
        now = self.clock()
        due = {}
        for role in TOP_LEVEL_ROLES:
            md = self.open(role)
            period = timedelta(days=self.settings.expiry_days[role])
            if md.signed.expires - now < period * self.settings.refresh_when_left:
                due[role] = md.signed.expires
        return due

    def refresh(self, force: bool = False) -> list[str]:
        """Re-sign what is about to expire (targets, then snapshot and timestamp as needed)."""
        due = set(self.expiring())
        done = []
        if force or "root" in due:
            root = self.open(Root.type)
            previous = Root.from_dict(copy.deepcopy(root.signed.to_dict()))
            root.signed.version += 1
            root.signed.expires = self._expiry(Root.type)
            sign_root(root, self.keys.signers_for("root", list(root.signed.roles["root"].keyids)), previous)
            self._write(Root.type, root)
            done.append("root")
        if force or "targets" in due:
            with self.edit_targets():
                pass
            done.append("targets")
        if self.do_snapshot(force=force or "snapshot" in due)[0]:
            done.append("snapshot")
        if self.do_timestamp(force=True)[0]:
            done.append("timestamp")
        return done
