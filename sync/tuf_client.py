"""What the hub signed, as this device sees it: python-tuf's ngclient, run off the event loop.

`HubClient.refresh()` is one pass of TUF's client workflow (ngclient's
`Updater`): root rotations, timestamp, snapshot, targets, each checked for
signatures by a threshold of trusted keys, version rollback, expiry and
consistency, and persisted under ``<state_dir>/tuf`` only once verified. It then
reads this device's desired states (small targets, downloaded and verified by
ngclient itself, whose fetcher stops at the signed length) and looks up the
signed length and hashes of every file they name. The large model files are
fetched afterwards by our resumable downloader and checked against that info.

ngclient is synchronous (urllib3): callers run `refresh` in a thread. Every
python-tuf error comes out as a security/ verdict or `HubUnreachable`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient import Updater, UpdaterConfig, Urllib3Fetcher

from security.desired import DesiredModel, DesiredState, desired_path, effective_models, parse_desired
from security.errors import MetadataRefused, RefusedError, TrustRootError
from security.trust import parse_trust_root
from security.verdicts import verdict

from .errors import HubUnreachable


@dataclass(frozen=True)
class SignedFile:
    """One file a desired state names: where to get it and what it must be."""

    target_path: str
    url: str
    length: int
    sha256: str


@dataclass(frozen=True)
class HubView:
    """The outcome of one verified refresh."""

    targets_version: int
    group: DesiredState | None
    device: DesiredState | None
    models: dict[str, DesiredModel] = field(default_factory=dict)
    files: dict[str, SignedFile] = field(default_factory=dict)

    def serial(self, scope: str) -> int:
        state = self.group if scope == "group" else self.device
        return state.serial if state else 0


class HubClient:
    """A TUF client for one hub URL, trusting one root (plus the rotations it signed)."""

    def __init__(
        self, metadata_dir: Path, hub_url: str, trust_root: bytes, group: str, device_id: str, timeout_s: int = 30
    ) -> None:
        parse_trust_root(trust_root)  # refuse a broken trust root before any network traffic
        self.metadata_dir = Path(metadata_dir)
        self.hub_url = hub_url.rstrip("/")
        self.trust_root = trust_root
        self.group = group
        self.device_id = device_id
        self.timeout_s = timeout_s

    def _updater(self, download_dir: str) -> Updater:
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        return Updater(
            metadata_dir=str(self.metadata_dir),
            metadata_base_url=f"{self.hub_url}/metadata/",
            target_dir=download_dir,
            target_base_url=f"{self.hub_url}/targets/",
            fetcher=Urllib3Fetcher(socket_timeout=self.timeout_s, app_user_agent="edgefleet"),
            config=UpdaterConfig(app_user_agent="edgefleet"),
            bootstrap=self.trust_root,
        )

    def refresh(self) -> HubView:
        """One verified look at the hub (blocking; run it in a thread)."""
        try:
            with tempfile.TemporaryDirectory(prefix="edgefleet-tuf-") as download_dir:
                updater = self._updater(download_dir)
                updater.refresh()
                targets_version = self._trusted_targets_version()
                group = self._desired(updater, "group", self.group)
                device = self._desired(updater, "device", self.device_id)
                models = effective_models(group, device)
                files = {}
                for model in models.values():
                    for target_path in model.files.values():
                        files[target_path] = self._signed_file(updater, target_path)
                return HubView(targets_version, group, device, models, files)
        except RefusedError:
            raise
        except tuf_errors.DownloadLengthMismatchError as exc:
            raise _verdict(exc) from None
        except tuf_errors.DownloadError as exc:
            raise HubUnreachable(f"hub {self.hub_url}: {exc}") from None
        except tuf_errors.RepositoryError as exc:
            raise _verdict(exc) from None
        except TrustRootError:
            raise
        except ValueError as exc:  # ngclient's "invalid argument" cases: malformed metadata
            raise MetadataRefused(f"metadata refused: {exc}") from None

    def _trusted_targets_version(self) -> int:
        md = Metadata[Targets].from_file(str(self.metadata_dir / "targets.json"))
        return md.signed.version

    def _desired(self, updater: Updater, scope: str, target: str) -> DesiredState | None:
        path = desired_path(scope, target)  # type: ignore[arg-type]
        info = updater.get_targetinfo(path)
        if info is None:
            return None
        local = updater.download_target(info)  # verified against length and hashes by ngclient
        return parse_desired(Path(local).read_bytes(), scope, target)  # type: ignore[arg-type]

    def _signed_file(self, updater: Updater, target_path: str) -> SignedFile:
        info = updater.get_targetinfo(target_path)
        if info is None:
            raise MetadataRefused(f"the desired state names {target_path}, which the signed targets do not list")
        return signed_file(self.hub_url, info)


def signed_file(hub_url: str, info: TargetFile) -> SignedFile:
    sha256 = info.hashes.get("sha256")
    if sha256 is None:
        raise MetadataRefused(f"{info.path} has no sha256 in the signed targets")
    directory, sep, base = info.path.rpartition("/")
    return SignedFile(info.path, f"{hub_url.rstrip('/')}/targets/{directory}{sep}{sha256}.{base}", info.length, sha256)


def _verdict(exc: BaseException) -> RefusedError:
    return verdict(exc) or MetadataRefused(str(exc))
