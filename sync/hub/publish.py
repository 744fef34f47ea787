"""Publishing: model bundles become signed targets, and a group's or device's desired state
names them.

One publish is one new targets version: every file of every bundle (by content
hash, so an unchanged file is stored once), the new desired state with its
serial one higher, then a new snapshot and timestamp. The doorbell that tells
devices to look is sent afterwards by the caller (sync/hub/mqtt_tools.py):
devices never need it to be right, only to be rung.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tuf.api.metadata import TargetFile

from runtime.bundle import read_bundle
from runtime.errors import BundleError
from security.desired import (
    DesiredModel,
    DesiredState,
    Scope,
    check_name,
    desired_path,
    doorbell_payload,
    model_file_path,
    parse_desired,
)
from security.errors import RefusedError

from ..errors import HubError
from ..mqtt.topics import Topics
from .repository import HubRepository


@dataclass(frozen=True)
class BundleSource:
    """A bundle directory to publish, and the model name it is published under."""

    path: Path
    name: str | None = None


@dataclass(frozen=True)
class PublishResult:
    scope: Scope
    target: str
    serial: int
    targets_version: int
    models: Mapping[str, str]
    doorbell: bytes

    def doorbell_topic(self, prefix: str) -> str:
        topics = Topics(prefix, self.target if self.scope == "group" else "-", self.target)
        return topics.group_desired if self.scope == "group" else topics.device_desired


def current_desired(repo: HubRepository, scope: Scope, target: str) -> DesiredState | None:
    data = repo.read_target(desired_path(scope, target))
    if data is None:
        return None
    try:
        return parse_desired(data, scope, target)
    except RefusedError as exc:
        raise HubError(f"the published desired state of {scope} {target} is unreadable: {exc}") from None


def publish(
    repo: HubRepository,
    scope: Scope,
    target: str,
    bundles: Sequence[BundleSource] = (),
    pins: Mapping[str, str] | None = None,
    remove: Sequence[str] = (),
) -> PublishResult:
    """Sign `bundles` as targets and make them (and `pins`: name -> an already published
    version) what `scope`/`target` should run; `remove` drops names from its desired state."""
    check_name(target, f"{scope} name")
    files: dict[str, TargetFile] = {}
    models: dict[str, DesiredModel] = {}
    for source in bundles:
        model = _add_bundle(repo, source, files)
        if model.name in models:
            raise HubError(f"model {model.name} is given twice")
        models[model.name] = model
    published = repo.targets().targets
    for name, version in (pins or {}).items():
        prefix = model_file_path(check_name(name, "model name"), check_name(version, "version"), "")
        paths = {p[len(prefix) :]: p for p in published if p.startswith(prefix)}
        if "model.toml" not in paths:
            raise HubError(f"{name} {version} was never published; publish its bundle first")
        models[name] = DesiredModel(name, version, paths)
    previous = current_desired(repo, scope, target)
    serial = (previous.serial if previous else 0) + 1
    models = {name: dataclasses.replace(model, serial=serial) for name, model in models.items()}
    merged = dict(previous.models) if previous else {}
    for name in remove:
        if merged.pop(name, None) is None:
            raise HubError(f"{scope} {target} does not run {name}")
    merged.update(models)
    state = DesiredState(
        scope, target, (previous.serial if previous else 0) + 1, merged, repo.clock().strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    files[desired_path(scope, target)] = repo.add_target_bytes(desired_path(scope, target), state.to_json())
    targets_version = repo.publish_targets(files)
    return PublishResult(
        scope=scope,
        target=target,
        serial=state.serial,
        targets_version=targets_version,
        models={m.name: m.version for m in merged.values()},
        doorbell=doorbell_payload(targets_version, state.serial, state.issued_at),
    )


def _add_bundle(repo: HubRepository, source: BundleSource, files: dict[str, TargetFile]) -> DesiredModel:
    try:
        bundle = read_bundle(source.path, name=source.name)
    except BundleError as exc:
        raise HubError(f"cannot publish {source.path}: {exc}") from None
    version = check_name(bundle.version, "version")
    published = repo.targets().targets
    entries: dict[str, str] = {}
    for path in sorted(Path(source.path).iterdir()):
        if path.name.startswith("."):
            continue
        if not path.is_file():
            raise HubError(f"{path}: a bundle holds plain files only")
        target_path = model_file_path(bundle.name, version, check_name(path.name, "file name"))
        info = repo.add_target_file(target_path, path)
        old = published.get(target_path)
        if old is not None and old.hashes != info.hashes:
            raise HubError(
                f"{bundle.name} {version} was already published with another {path.name}; "
                "a version is immutable: give the new bundle a new version in model.toml"
            )
        files[target_path] = info
        entries[path.name] = target_path
    return DesiredModel(bundle.name, version, entries)
