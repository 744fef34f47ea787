"""The update service: from "the hub may have something" to a new version serving, or not.

Triggers (a doorbell on MQTT, a reconnect, a check-now command, a timer while
MQTT is down, start-up) all lead to the same level-triggered `reconcile`: ask
the hub, through TUF, what this device should run; compare with what serves;
run one update job per model that differs. A job moves through

    queued → downloading → verifying → staged → activating → health-check → active

and ends in exactly one terminal state: ``active``, ``failed`` (nothing changed:
the old version served throughout), ``rolled-back`` (the new version was loaded
or served and was replaced by the old one again) or ``rejected`` (what the hub
or MQTT said was not acted on: signatures, expiry, rollback, policy, forged or
stale doorbells). Every transition is written to the journal first, then
reported (sync/reporter.py) on the device's update topic.

What "activating" means: the version is laid out in the store and loaded beside
the serving one (staged), answers its probe (a real inference), and only then
the store's `current` and the registry switch to it; the old version stays
loaded until `health-check` passes, so a rollback is one switch back. A crash
at any step leaves `current` on a complete, verified version: `recover_after_crash()`
runs before the models load at start-up and puts `current` back on the confirmed
version when an activation was interrupted; the job then resumes (downloads
continue where they stopped) or, after `max_activation_attempts`
interruptions, ends rolled-back. A version that failed verification or its
health check is denied until the hub publishes that model's desired entry anew.

What serves is what the config's ``[[models]]`` lists plus what the hub's accepted
desired state lists: a name the hub stops listing, which the config does not list,
is unloaded. Nothing read from MQTT changes what serves: the cmd topic's only
command is ``check-now``; a ``rollback`` there is refused with the reason. Operator
rollback (`rollback`) is local, through the authenticated HTTP interface, and goes
to the last version that served well before the current one.

Every look at the hub has one deadline (`HubClient.refresh_async`,
``updates.refresh_timeout_s``) and runs in a daemon thread that shutdown does not
wait for.

Talks to the runtime only through `ModelStore` and `ModelRegistry`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from runtime.errors import RuntimeLayerError
from runtime.registry import ModelRegistry, RegistryEvent, RegistryEventKind
from runtime.store import ModelStore
from security.desired import DesiredModel, Doorbell, parse_doorbell
from security.errors import (
    OtherReleaseRefused,
    RefusedError,
    SecurityError,
    StaleDesiredState,
    TargetMismatch,
    TrustRootError,
    WrongLength,
)

from .downloader import Downloader, DownloadStats, Fetch, Progress
from .errors import (
    ActivationFailed,
    DiskFull,
    HealthCheckFailed,
    HubUnreachable,
    SyncError,
    UpdateInterrupted,
    UpdateTimedOut,
)
from .journal import JobRecord, Journal
from .mqtt import Topics
from .reporter import Reporter
from .tuf_client import HubClient, HubView, SignedFile
from .update_health import Health, UpdateHealth
from .update_settings import UpdateSettings

if TYPE_CHECKING:  # the link's module imports paho: only an agent with [mqtt] loads it
    from .mqtt import InboundMessage, MqttLink

log = logging.getLogger(__name__)

SCHEMA = "edgefleet.update/1"


class JobState(StrEnum):
    QUEUED = "queued"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    ACTIVATING = "activating"
    HEALTH_CHECK = "health-check"
    ACTIVE = "active"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"
    REJECTED = "rejected"


#: The answer to a `rollback` on the cmd topic. MQTT is a doorbell: anyone who may publish
#: there (a shared broker account, a compromised broker) must not change what serves.
ROLLBACK_REFUSED = (
    "rollback is not accepted over MQTT, since nothing read from MQTT may change what a device serves "
    "unless it is signed: roll a fleet back with `edgefleet hub publish --pin NAME=VERSION` (signed), "
    "or one device with `edgefleet models rollback NAME` on that device"
)

TERMINAL = frozenset({JobState.ACTIVE, JobState.FAILED, JobState.ROLLED_BACK, JobState.REJECTED})
#: failures whose cause may pass by itself: the timer looks again soon (`retry_min_s`, doubling)
RETRYABLE = frozenset({"hub-unreachable", "download", "disk-full", "timeout"})
#: steps after which `current` may point at the new version
SWITCHING = frozenset({JobState.ACTIVATING.value, JobState.HEALTH_CHECK.value})


@dataclass(frozen=True)
class Trigger:
    reason: str
    doorbell: Doorbell | None = None
    scope: str | None = None


def journal_path(state_dir: Path) -> Path:
    return Path(state_dir) / "sync" / "journal.json"


def recover_after_crash(store: ModelStore, state_dir: Path) -> list[str]:
    """At start-up, before any model loads: repair the store, and wherever an activation was
    interrupted put `current` back on the confirmed version and count the interruption
    (the job then resumes, or is given up at `max_activation_attempts`). Returns notes for
    the log."""
    notes = store.recover()
    journal = Journal(journal_path(state_dir))
    for name, job in list(journal.data.jobs.items()):
        if job.state not in SWITCHING:
            continue
        record = store.record(name)
        if record.confirmed and store.current(name) != record.confirmed:
            try:
                store.roll_back(name, reason=f"agent restarted while {job.state} {job.version}")
                notes.append(f"{name}: interrupted while {job.state} {job.version}; serving {record.confirmed}")
            except RuntimeLayerError as exc:
                notes.append(f"{name}: interrupted while {job.state} {job.version}; cannot fall back: {exc}")
        job.attempts += 1
        job.state = JobState.QUEUED.value
    journal.save()
    return notes


class UpdateService:
    """Owns the update loop, the reporter and the MQTT subscriptions of signed updates."""

    def __init__(
        self,
        settings: UpdateSettings,
        store: ModelStore,
        registry: ModelRegistry,
        hub: HubClient,
        topics: Topics,
        state_dir: Path,
        link: MqttLink | None = None,
        progress: Callable[[SignedFile], Progress | None] | None = None,
        configured: Callable[[], Collection[str]] | None = None,
    ) -> None:
        """`configured`: the names the config's ``[[models]]`` lists now (a reload changes
        them); with it, a name the hub's desired state drops stops serving unless listed
        there. Without it, nothing is ever unloaded here."""
        self.settings = settings
        self.store = store
        self.registry = registry
        self.hub = hub
        self.topics = topics
        self.link = link
        self.journal = Journal(journal_path(state_dir))
        self.reporter = Reporter(topics.update, self._publish_report if link else None,
                                 queue=link.send_queue("update report") if link else None)
        self._progress = progress
        self._configured = configured
        self._triggers: asyncio.Queue[Trigger] = asyncio.Queue()
        self._tasks: list[asyncio.Task[Any]] = []
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._last_rejection: tuple[str, str] | None = None
        self._in_job = False
        self.download_stats: dict[str, DownloadStats] = {}
        self.reconciled = asyncio.Event()
        self.health = UpdateHealth()
        self._listeners: list[Callable[[], None]] = []
        self._transition_listeners: list[Callable[[dict[str, Any]], None]] = []
        #: looks at the hub in a row that ended with a cause that may pass (RETRYABLE)
        self._failures = 0
        self._retry = False

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the loop) after every job transition and every look at the hub:
        the reported state (agent/fleet/reported.py) follows without polling."""
        self._listeners.append(callback)

    def on_transition(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call `callback(payload)` (on the loop) with every job transition as it is reported
        (the audit log records each one: agent/fleet/audit.py)."""
        self._transition_listeners.append(callback)

    def _notify(self) -> None:
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:  # a listener's bug must not stop an update
                log.exception("update listener failed")

    # ---- start-up and shutdown ----------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self.registry.subscribe(self._on_registry_event)
        self._tasks.append(asyncio.create_task(self.reporter.run(), name="update-reporter"))
        self._republish_last()
        if self.link is not None:
            await self.link.subscribe(self.topics.group_desired, self._on_doorbell)
            await self.link.subscribe(self.topics.device_desired, self._on_doorbell)
            await self.link.subscribe(self.topics.cmd, self._on_command)
            self.link.add_connect_hook(self._on_connect)
        self._tasks.append(asyncio.create_task(self._loop(), name="update-loop"))
        self.trigger("start")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()

    def trigger(self, reason: str, doorbell: Doorbell | None = None, scope: str | None = None) -> None:
        self._triggers.put_nowait(Trigger(reason, doorbell, scope))

    # ---- MQTT ---------------------------------------------------------------------------

    async def _on_connect(self, info: Any) -> None:
        self.trigger("reconnect")  # level-triggered: whatever changed while we were away

    async def _on_doorbell(self, message: InboundMessage) -> None:
        doorbell = parse_doorbell(message.payload)
        if doorbell is None:
            if message.payload:
                log.warning("ignoring a message on %s that is not a doorbell", message.topic)
            return
        scope = "group" if message.topic == self.topics.group_desired else "device"
        self.trigger("doorbell", doorbell, scope)

    async def _on_command(self, message: InboundMessage) -> None:
        not_json = False
        try:
            body = message.json()
            command = body.get("command") if isinstance(body, dict) else None
        except ValueError:
            command, not_json = None, True
        reply: dict[str, Any]
        if not_json:
            reply = {"ok": False, "error": 'the command is not JSON; send {"command": "check-now"}'}
        elif command == "check-now":
            try:
                outcome = await self.check_now()
                reply = {"ok": True, "command": command, **outcome}
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not leave the asker without an answer
                log.exception("check-now failed")
                reply = {"ok": False, "command": command,
                         "error": f"check-now failed on the device ({type(exc).__name__}); see the agent's log"}
        elif command == "rollback":
            log.warning("refused a rollback command from MQTT: what serves changes only by a signed desired "
                        "state or on the device")
            reply = {"ok": False, "command": command, "error": ROLLBACK_REFUSED}
        else:
            reply = {"ok": False, "error": 'unknown command; use {"command": "check-now"}'}
        if message.response_topic and self.link is not None:
            try:
                await self.link.reply(message, reply)
            except SyncError as exc:
                log.warning("command reply not sent: %s", exc)

    async def _publish_report(self, topic: str, payload: bytes) -> None:
        assert self.link is not None
        await self.link.publish(topic, payload, qos=1, retain=True)

    def _republish_last(self) -> None:
        """After a restart, the retained update topic says where each model's last job stands."""
        for name in sorted(self.journal.data.last):
            last = dict(self.journal.data.last[name])
            job = self.journal.data.jobs.get(name)
            if job is not None:
                last.update(state=job.state, note="agent restarted; resuming")
            self.reporter.report(last)

    def _on_registry_event(self, event: RegistryEvent) -> None:
        if self._in_job or event.kind is RegistryEventKind.STATUS:
            return  # the job reports its own transitions
        log.info("registry: %s %s %s", event.name, event.kind.value, event.version)

    # ---- the loop ----------------------------------------------------------------------

    async def _loop(self) -> None:
        """One reconcile per burst of triggers; with none, a look on the timer: every
        `poll_interval_s` while MQTT cannot ring, every `check_interval_s` (jittered) while it
        can, so one lost doorbell delays a device by one interval at most. After a failure that
        may pass (the hub or the link away mid-download), sooner: `retry_min_s`, doubling."""
        while True:
            connected = self.link is not None and self.link.connected
            timeout = self.settings.next_wait(connected, random.random(), self._failures)
            try:
                first = await asyncio.wait_for(self._triggers.get(), timeout)
            except TimeoutError:
                first = Trigger("check" if connected else "poll")
            batch = [first]
            while not self._triggers.empty():
                batch.append(self._triggers.get_nowait())
            self._retry = False
            try:
                await self.reconcile(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop updates for good
                log.exception("update reconcile failed")
            finally:
                self._failures = self._failures + 1 if self._retry else 0
                self.reconciled.set()

    async def check_now(self) -> dict[str, Any]:
        """One reconcile now (the cmd topic's check-now); returns what it did."""
        return await self.reconcile([Trigger("check-now")])

    async def reconcile(self, triggers: list[Trigger]) -> dict[str, Any]:
        async with self._lock:
            reasons = sorted({t.reason for t in triggers})
            before = {"group": self.journal.data.group_serial, "device": self.journal.data.device_serial}
            try:
                view = await self.hub.refresh_async()  # deadline: updates.refresh_timeout_s
            except (RefusedError, TrustRootError) as exc:
                health = Health.TRUST_ROOT_UNREADABLE if isinstance(exc, TrustRootError) else Health.REFUSED
                self.health.checked(health, exc.code, str(exc))
                self._reject(exc, force=any(t.reason in ("doorbell", "check-now") for t in triggers))
                return {"outcome": "rejected", "code": exc.code, "message": str(exc)}
            except HubUnreachable as exc:
                log.warning("hub not reachable (%s): %s", ", ".join(reasons), exc)
                self.health.checked(Health.HUB_UNREACHABLE, HubUnreachable.code, str(exc))
                self._retry = True
                self._notify()
                return {"outcome": "hub-unreachable", "message": str(exc)}
            self.health.checked(Health.OK)
            self._last_rejection = None
            for t in triggers:
                if t.doorbell is not None and t.scope is not None:
                    self._judge_doorbell(t.doorbell, t.scope, view, before[t.scope])
            for scope in ("group", "device"):
                if view.serial(scope) < before[scope]:
                    self._reject(
                        StaleDesiredState(
                            f"the hub's {scope} desired state is serial {view.serial(scope)}; "
                            f"serial {before[scope]} was already accepted"
                        ),
                        force=True,
                    )
                    return {"outcome": "rejected", "code": StaleDesiredState.code}
            self.journal.accept_serials(view.serial("group"), view.serial("device"), view.targets_version)
            self.journal.data.desired_entries = {name: desired_entry(model) for name, model in view.models.items()}
            for model in view.models.values():
                self.journal.see_entry(model.name, self._entry_serial(view, model))
            self.journal.accept_models(list(view.models))
            self.journal.save()
            results = {}
            for name in sorted(view.models):
                results[name] = await self._reconcile_model(view, view.models[name])
            for name in await self._unload_undesired(view):
                results[name] = "unloaded"
            self._notify()
            return {"outcome": "reconciled", "targets_version": view.targets_version, "models": results}

    async def _unload_undesired(self, view: HubView) -> list[str]:
        """What serves is what ``[[models]]`` lists plus what the hub's desired state lists: a
        name the hub stopped listing, which the config does not list either, stops serving."""
        if self._configured is None:
            return []
        keep = set(view.models) | set(self._configured())
        dropped = []
        for status in self.registry.statuses():
            if status.name in keep:
                continue
            log.info("model %s: unloading, as neither [[models]] nor the hub's desired state lists it now",
                     status.name, extra={"model": status.name})
            with contextlib.suppress(RuntimeLayerError):
                await self.registry.unload(status.name)
            dropped.append(status.name)
        return dropped

    @staticmethod
    def _entry_serial(view: HubView, model: DesiredModel) -> int:
        """Group and device serials count separately: a device entry sorts above any group one."""
        from_device = view.device is not None and model.name in view.device.models
        return model.serial + (1 << 32 if from_device else 0)

    def _judge_doorbell(self, doorbell: Doorbell, scope: str, view: HubView, accepted: int) -> None:
        signed = view.serial(scope)
        if doorbell.serial is None:
            return
        if doorbell.serial > signed:
            self._report_refusal(
                "doorbell-unsigned",
                f"a doorbell on the {scope} topic announced {doorbell.announces}; the hub's "
                f"signed {scope} desired state is serial {signed}: nothing installed",
            )
        elif doorbell.serial < accepted:
            self._report_refusal(
                "doorbell-stale",
                f"a doorbell on the {scope} topic announced serial {doorbell.serial}, older than "
                f"serial {accepted} already accepted: replayed, ignored",
            )

    def _reject(self, exc: SecurityError | SyncError, force: bool) -> None:
        key = (exc.code, str(exc))
        log.error("update refused (%s): %s", exc.code, exc)
        if not force and key == self._last_rejection:
            return  # a poll that finds the same broken hub again says nothing new
        self._last_rejection = key
        self._report_refusal(exc.code, str(exc))

    def _report_refusal(self, code: str, message: str) -> None:
        self._transition(None, JobState.REJECTED, code=code, message=message)

    # ---- one model ---------------------------------------------------------------------

    async def _reconcile_model(self, view: HubView, desired: DesiredModel) -> str:
        name, version = desired.name, desired.version
        current = self.store.current(name)
        job = self.journal.data.jobs.get(name)
        if job is not None and job.version != version:
            self._end(job, JobState.FAILED, "superseded", f"desired version is now {version}")
            job = None
        if job is not None and current == version and self.store.record(name).confirmed == version:
            self._end(job, JobState.ACTIVE)  # the agent stopped between confirming and saying so
            return JobState.ACTIVE.value
        if current == version and job is None:
            known = {status.name for status in self.registry.statuses()}
            with contextlib.suppress(RuntimeLayerError):  # the registry logs a failed load and shows it
                # not served yet (the hub lists a stored name anew), or on disk but not serving (a failed
                # start-up load): load it; an idle-unloaded one is known and left to its next request
                if name not in known or self.registry.get(name).version != version:
                    await self.registry.load(self.store.bundle(name))
            return "up-to-date"
        denied = self.journal.denied(name, version)
        if denied is not None and job is None:
            log.info("%s %s is denied until the hub publishes it anew (%s)", name, version, denied.message)
            return "denied"
        if job is None:
            job = self._new_job(name, version, current)
            self.journal.data.jobs[name] = job
        if job.attempts >= self.settings.max_activation_attempts:
            self._deny_and_end(
                job,
                JobState.ROLLED_BACK,
                UpdateInterrupted(
                    f"{name} {version}: the agent stopped during its activation {job.attempts} time(s); given up"
                ),
            )
            return JobState.ROLLED_BACK.value
        self._transition(job, JobState.QUEUED)
        self._in_job = True
        try:
            async with asyncio.timeout(self.settings.job_timeout_s):
                return (await self._run_job(job, view, desired)).value
        except TimeoutError:
            await self._abandon(job, UpdateTimedOut(f"{name} {version}: not done in {self.settings.job_timeout_s:g}s"))
            return JobState.FAILED.value
        finally:
            self._in_job = False

    async def _run_job(self, job: JobRecord, view: HubView, desired: DesiredModel) -> JobState:
        name, version = desired.name, desired.version
        files = {file: view.files[path] for file, path in desired.files.items()}
        # downloading
        self._transition(job, JobState.DOWNLOADING)
        try:
            await self._download(job, files)
        except RefusedError as exc:
            return self._deny_and_end(job, JobState.FAILED, exc)
        except (HubUnreachable, DiskFull, SyncError) as exc:
            return self._end(job, JobState.FAILED, exc.code, str(exc))  # not denied: tried again later
        # verifying: every byte of every file, as it lies in the store
        self._transition(job, JobState.VERIFYING)
        try:
            await asyncio.to_thread(self._verify, desired, files)
        except RefusedError as exc:
            return self._deny_and_end(job, JobState.FAILED if exc.code != "other-release" else JobState.REJECTED, exc)
        # staged: laid out beside the serving version and loaded
        try:
            await asyncio.to_thread(self.store.lay_out, name, version, {f: s.sha256 for f, s in files.items()})
            bundle = self.store.bundle(name, version)
            staged = await self.registry.stage(bundle)
        except RuntimeLayerError as exc:
            return self._deny_and_end(job, JobState.FAILED, ActivationFailed(f"{name} {version}: {exc}"))
        self._transition(job, JobState.STAGED)
        # activating: probe the staged version, then switch store and registry
        self._transition(job, JobState.ACTIVATING)
        try:
            summary = await self.registry.probe(staged)
        except RuntimeLayerError as exc:
            await self.registry.discard(staged, str(exc))
            return self._deny_and_end(
                job,
                JobState.ROLLED_BACK,
                HealthCheckFailed(
                    f"{name} {version} failed its probe; {job.from_version or 'nothing'} kept serving: {exc}"
                ),
            )
        log.info("%s %s answered its probe (%s)", name, version, summary)
        await asyncio.to_thread(self.store.activate, name, version, f"update job {job.job_id}")
        await self.registry.commit(staged)
        # health check: real inferences through the serving path
        self._transition(job, JobState.HEALTH_CHECK)
        try:
            for i in range(self.settings.health_checks):
                if i:
                    await asyncio.sleep(self.settings.health_check_interval_s)
                await self.registry.probe(self.registry.get(name))
        except RuntimeLayerError as exc:
            await self._roll_back_serving(name, f"health check failed: {exc}")
            return self._deny_and_end(
                job,
                JobState.ROLLED_BACK,
                HealthCheckFailed(f"{name} {version} failed its health check and was rolled back: {exc}"),
            )
        await asyncio.to_thread(self.store.confirm, name, version)
        await self.registry.confirm(name)
        with contextlib.suppress(RuntimeLayerError, OSError):
            await asyncio.to_thread(self.store.prune, name, self.settings.keep_versions)
        return self._end(job, JobState.ACTIVE)

    async def _download(self, job: JobRecord, files: dict[str, SignedFile]) -> None:
        missing = {f: s for f, s in files.items() if not self.store.has_blob(s.sha256)}
        need = sum(s.length - _partial_size(self.store.staging_path(s.sha256)) for s in missing.values())
        free = await asyncio.to_thread(self.store.free_bytes)
        if need + self.settings.min_free_mb * (1 << 20) > free:
            raise DiskFull(
                f"{job.model} {job.version} needs {need / 2**20:.0f} MB more, plus "
                f"{self.settings.min_free_mb} MB kept free; {free / 2**20:.0f} MB are free"
            )
        assert self._session is not None
        downloader = Downloader(
            self._session, retries=self.settings.download_retries, read_timeout_s=self.settings.read_timeout_s
        )
        for signed in missing.values():
            stats = self.download_stats.setdefault(signed.sha256, DownloadStats())
            dest = self.store.staging_path(signed.sha256)
            progress = self._progress(signed) if self._progress else None
            path = await downloader.fetch(Fetch(signed.url, signed.length, signed.sha256, dest), progress, stats)
            await asyncio.to_thread(self.store.add_blob, path, signed.sha256)

    def _verify(self, desired: DesiredModel, files: dict[str, SignedFile]) -> None:
        for file, signed in files.items():
            path = self.store.blob_path(signed.sha256)
            if path.stat().st_size != signed.length:
                path.unlink(missing_ok=True)
                raise WrongLength(f"{desired.name} {desired.version}: {file} in the store is not the signed length")
            if not self.store.verify_blob(signed.sha256):
                path.unlink(missing_ok=True)
                raise TargetMismatch(f"{desired.name} {desired.version}: {file} in the store is not the signed bytes")
        toml = self.store.blob_path(files["model.toml"].sha256).read_text(encoding="utf-8", errors="replace")
        if f'version = "{desired.version}"' not in toml:
            raise OtherReleaseRefused(f"{desired.name}: the signed model.toml is not that of version {desired.version}")

    async def _roll_back_serving(self, name: str, reason: str) -> str:
        """Serve the last version of `name` that served well before this one (runtime/store.py
        `roll_back`), never one denied now."""
        denied = {d.version for d in self.journal.data.deny if d.model == name}
        target = await asyncio.to_thread(self.store.roll_back, name, reason, denied)
        bundle = self.store.bundle(name, target)
        await self.registry.rollback(name, reason, bundle=bundle)
        return target

    async def _abandon(self, job: JobRecord, exc: SyncError) -> None:
        if job.state in SWITCHING and self.store.current(job.model) == job.version:
            with contextlib.suppress(RuntimeLayerError):
                await self._roll_back_serving(job.model, str(exc))
            self._deny_and_end(job, JobState.ROLLED_BACK, exc)
        else:
            self._end(job, JobState.FAILED, exc.code, str(exc))

    # ---- operator rollback ---------------------------------------------------------------

    async def rollback(self, name: str, reason: str) -> str:
        """Serve again the last version of `name` that served well before the current one
        (`edgefleet models rollback`, through the local HTTP interface); the version rolled
        back from is denied until the hub publishes that model anew. Raises `StoreError` (a
        sentence) when there is no such model or no such version."""
        async with self._lock:
            current = self.store.current(name)
            target = await self._roll_back_serving(name, reason)
            job = self._new_job(name, target, current)
            if current is not None:
                self.journal.deny(name, current, "operator", reason)
            self._transition(job, JobState.ROLLED_BACK, code="operator", message=reason)
            self.journal.save()
            return target

    # ---- transitions ----------------------------------------------------------------------

    def _new_job(self, name: str, version: str, from_version: str | None) -> JobRecord:
        """A job for `name` toward `version`, not started yet, under the current desired serial."""
        return JobRecord(job_id=uuid.uuid4().hex[:12], model=name, version=version, from_version=from_version,
                         state=JobState.QUEUED.value, serial=self.journal.data.serial_key)

    def _deny_and_end(self, job: JobRecord, state: JobState, exc: SecurityError | SyncError) -> JobState:
        self.journal.deny(job.model, job.version, exc.code, str(exc))
        return self._end(job, state, exc.code, str(exc))

    def _end(self, job: JobRecord, state: JobState, code: str | None = None, message: str | None = None) -> JobState:
        if state is JobState.FAILED and code in RETRYABLE:
            self._retry = True
        if code is not None:
            log.error("update %s %s %s: %s (%s)", job.model, job.version, state.value, message, code)
        self._transition(job, state, code=code, message=message)
        return state

    def _transition(
        self, job: JobRecord | None, state: JobState, code: str | None = None, message: str | None = None
    ) -> None:
        payload = {
            "schema": SCHEMA,
            "device": self.topics.device_id,
            "group": self.topics.group,
            "seq": self.journal.next_seq(),
            "job": job.job_id if job else uuid.uuid4().hex[:12],
            "model": job.model if job else None,
            "version": job.version if job else None,
            "from_version": job.from_version if job else None,
            "state": state.value,
            "code": code,
            "message": message,
            "serial": self.journal.data.serial_key,
            "targets_version": self.journal.data.targets_version,
            "serving": {s.name: s.version for s in self.registry.serving()},
            "at": round(time.time(), 3),
        }
        if job is not None:
            job.state = state.value
            job.reason = message
            if state in TERMINAL:
                self.journal.data.jobs.pop(job.model, None)
            self.journal.data.last[job.model] = payload
        self.journal.save()
        if state in TERMINAL or state is JobState.QUEUED:
            log.info("update %s: %s %s -> %s", payload["job"], payload["model"], payload["version"], state.value)
        self.reporter.report(payload)
        for listener in list(self._transition_listeners):
            try:
                listener(payload)
            except Exception:  # a listener's bug must not stop an update
                log.exception("update transition listener failed")
        if state is JobState.REJECTED and job is None:
            self.health.set(Health.REFUSED, code, message)
        self._notify()

    def reported(self) -> dict[str, Any]:
        """The update side of the reported state (edgefleet.reported/1, docs/mqtt.md)."""
        data = self.journal.data
        terminal = {name: last for name, last in data.last.items() if last.get("state") in TERMINAL}
        last_job = max(terminal.values(), key=lambda m: m.get("seq", 0), default=None)
        return {
            "updates": {
                **self.health.to_json(),
                "check_interval_s": self.settings.check_interval_s,
                "accepted_serial": data.serial_key,
                "targets_version": data.targets_version,
            },
            "desired": dict(data.desired_entries),
            "jobs": {name: job.state for name, job in data.jobs.items()},
            "jobs_last": {name: _job_summary(last) for name, last in terminal.items()},
            "last_job": _job_summary(last_job) if last_job else None,
            "denied": [{"model": d.model, "version": d.version, "code": d.code} for d in data.deny],
        }

    def status(self) -> dict[str, Any]:
        data = self.journal.data
        return {
            "accepted_serial": data.serial_key,
            "targets_version": data.targets_version,
            "jobs": {k: v.state for k, v in data.jobs.items()},
            "deny": [{"model": d.model, "version": d.version, "code": d.code} for d in data.deny],
            "reports_pending": self.reporter.pending,
        }


def desired_entry(model: DesiredModel) -> dict[str, Any]:
    """What the reported state says of one desired model: its version and where it came from."""
    return {"version": model.version, "origin": model.origin,
            "rollout": model.rollout.id if model.rollout is not None else None, "serial": model.serial}


def _job_summary(payload: dict[str, Any]) -> dict[str, Any]:
    keys = ("job", "model", "version", "from_version", "state", "code", "message", "at")
    return {key: payload.get(key) for key in keys}


def _partial_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
