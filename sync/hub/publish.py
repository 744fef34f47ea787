"""Publishing: model bundles become signed targets, and a group's or device's desired state
names them.

One publish is one new targets version: every file of every bundle (by content
hash, so an unchanged file is stored once), the new desired state with its
serial one higher, then a new snapshot and timestamp. The doorbell that tells
devices to look is sent afterwards by the caller (sync/hub/mqtt_tools.py):
devices never need it to be right, only to be rung.

A staged rollout (sync/hub/rollouts/) changes a group's state through three more
doors: `publish_rollout_step` (the entry keeps its base version and carries the
rollout with a new share), `complete_rollout` (the rollout's version becomes the
base) and `abort_rollout` (the rollout goes, the base is signed as a pin). While a
rollout runs, `publish` refuses to touch that model in that group: two writers of
one entry would undo each other. Every change to the repository holds the hub's
publish lock (flock on ``<hub>/.publish.lock``), so the CLI and the rollout
controller never interleave two targets versions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tuf.api.metadata import TargetFile

from runtime.bundle import read_bundle
from runtime.errors import BundleError
from security.desired import (
    DesiredModel,
    DesiredState,
    Rollout,
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


@contextlib.contextmanager
def publish_lock(repo: HubRepository) -> Iterator[None]:
    """Hold the hub's publish lock: one targets version is made at a time, whoever makes it."""
    repo.dir.mkdir(parents=True, exist_ok=True)
    with open(repo.dir / ".publish.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


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
    with publish_lock(repo):
        files: dict[str, TargetFile] = {}
        models: dict[str, DesiredModel] = {}
        for source in bundles:
            model = _add_bundle(repo, source, files)
            if model.name in models:
                raise HubError(f"model {model.name} is given twice")
            models[model.name] = model
        for name, version in (pins or {}).items():
            models[name] = DesiredModel(name, version, published_files(repo, name, version))
        previous = current_desired(repo, scope, target)
        _refuse_running_rollouts(previous, [*models, *remove])
        serial = (previous.serial if previous else 0) + 1
        models = {name: dataclasses.replace(model, serial=serial) for name, model in models.items()}
        merged = dict(previous.models) if previous else {}
        for name in remove:
            if merged.pop(name, None) is None:
                raise HubError(f"{scope} {target} does not run {name}")
        merged.update(models)
        return _sign_state(repo, scope, target, serial, merged, files)


def published_files(repo: HubRepository, name: str, version: str) -> dict[str, str]:
    """file -> target path of an already published version; refused if it never was."""
    prefix = model_file_path(check_name(name, "model name"), check_name(version, "version"), "")
    paths = {p[len(prefix) :]: p for p in repo.targets().targets if p.startswith(prefix)}
    if "model.toml" not in paths:
        raise HubError(f"{name} {version} was never published; publish its bundle first")
    return paths


def _refuse_running_rollouts(state: DesiredState | None, names: Sequence[str]) -> None:
    for name in names:
        entry = state.models.get(name) if state else None
        if entry is not None and entry.rollout is not None:
            raise HubError(
                f"{state.target if state else ''}: {name} is in staged rollout {entry.rollout.id} "
                f"(to {entry.rollout.version}); wait for it to complete, or stop it first with "
                f"`edgefleet hub rollout abort {entry.rollout.id}`"
            )


def _sign_state(
    repo: HubRepository, scope: Scope, target: str, serial: int, models: Mapping[str, DesiredModel],
    files: dict[str, TargetFile],
) -> PublishResult:
    """Sign `models` as `scope`/`target`'s desired state `serial`, with `files` as new targets."""
    state = DesiredState(scope, target, serial, dict(models), repo.clock().strftime("%Y-%m-%dT%H:%M:%SZ"))
    files[desired_path(scope, target)] = repo.add_target_bytes(desired_path(scope, target), state.to_json())
    targets_version = repo.publish_targets(files)
    return PublishResult(
        scope=scope,
        target=target,
        serial=state.serial,
        targets_version=targets_version,
        models={m.name: m.version for m in state.models.values()},
        doorbell=doorbell_payload(targets_version, state.serial, state.issued_at),
    )


# ---- staged rollouts -----------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutTarget:
    """What a rollout moves a group to: a version, and its files as signed targets."""

    name: str
    version: str
    files: Mapping[str, str]


def rollout_target(repo: HubRepository, bundle: BundleSource | None = None, name: str | None = None,
                   version: str | None = None) -> RolloutTarget:
    """Sign `bundle`'s files as targets (no desired state changes), or look up the already
    published `name` `version`."""
    with publish_lock(repo):
        if bundle is not None:
            files: dict[str, TargetFile] = {}
            model = _add_bundle(repo, bundle, files)
            if any(path not in repo.targets().targets for path in files):
                repo.publish_targets(files)
            return RolloutTarget(model.name, model.version, dict(model.files))
        if name is None or version is None:
            raise HubError("a rollout needs a bundle directory or NAME=VERSION")
        return RolloutTarget(name, version, published_files(repo, name, version))


def publish_rollout_step(
    repo: HubRepository, group: str, target: RolloutTarget, rollout_id: str, percent: float, salt: str,
    from_version: str | None = None,
) -> PublishResult:
    """Sign `group`'s state with `target`'s rollout at `percent`: the entry keeps its base
    version and serial; the rollout keeps the serial it started at (its first step's).
    `from_version` (when given) must still be the base: a rollout is refused if someone
    changed the entry under it."""
    with publish_lock(repo):
        previous = current_desired(repo, "group", group)
        base = previous.models.get(target.name) if previous else None
        if previous is None or base is None:
            raise HubError(
                f"group {group} does not run {target.name} yet: publish a first version with `edgefleet hub "
                f"publish --group {group}`; a staged rollout moves a group from one version to another"
            )
        if from_version is not None and base.version != from_version:
            raise HubError(f"group {group} runs {target.name} {base.version} now, not {from_version}: "
                           "its entry changed under the rollout")
        running = base.rollout
        if running is not None and running.id != rollout_id:
            _refuse_running_rollouts(previous, [target.name])
        if running is None and base.version == target.version:
            raise HubError(f"group {group} already runs {target.name} {target.version}")
        serial = previous.serial + 1
        rollout = Rollout(rollout_id, target.version, dict(target.files), float(percent), salt,
                          running.serial if running is not None else serial)
        models = dict(previous.models)
        models[target.name] = dataclasses.replace(base, rollout=rollout)
        return _sign_state(repo, "group", group, serial, models, {})


def complete_rollout(repo: HubRepository, group: str, name: str, rollout_id: str) -> PublishResult:
    """The rollout's version becomes the group's base entry (serial: the rollout's)."""
    with publish_lock(repo):
        previous, _, rollout = _running(repo, group, name, rollout_id)
        models = dict(previous.models)
        models[name] = DesiredModel(name, rollout.version, dict(rollout.files), rollout.serial, "group")
        return _sign_state(repo, "group", group, previous.serial + 1, models, {})


def abort_rollout(repo: HubRepository, group: str, name: str, rollout_id: str) -> PublishResult:
    """The rollout goes and the base entry is signed as a pin: every device that moved goes
    back to the base version."""
    with publish_lock(repo):
        previous, entry, _ = _running(repo, group, name, rollout_id)
        models = dict(previous.models)
        models[name] = dataclasses.replace(entry, origin="pin", rollout=None)
        return _sign_state(repo, "group", group, previous.serial + 1, models, {})


def _running(repo: HubRepository, group: str, name: str, rollout_id: str) -> tuple[DesiredState, DesiredModel, Rollout]:
    previous = current_desired(repo, "group", group)
    entry = previous.models.get(name) if previous else None
    if previous is None or entry is None or entry.rollout is None or entry.rollout.id != rollout_id:
        raise HubError(f"group {group}'s signed state has no rollout {rollout_id} of {name}")
    return previous, entry, entry.rollout


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
