"""Alerts on the device, as one cleanup context: read the values, run the rules, publish.

Every ``[alerts] interval_s`` (the live config: a reload changes the rules) it
reads one value per rule from what the agent already keeps — the sampler's
system and energy snapshots, the registry's statuses and TTFT histograms, the
HTTP request counter, the outbox's and the send queue's drop counters, the update
service's jobs and health — and feeds them to the pure engine (sync/alerts/).
A transition is logged, shown in /metrics (``edgefleet_alert_firing``) and
published on ``{prefix}/devices/{id}/alerts/{rule}`` (docs/mqtt.md#alerts)
through the telemetry outbox, so it survives a broker outage and arrives in
order: ``firing`` retained; ``resolved`` not retained, then an empty retained
message that clears the firing one — what is retained is exactly what fires.

Firing alerts are kept in ``<state_dir>/alerts.json``: after a restart they
resolve through the usual levels, so their retained message is cleared rather
than left behind. After a connect with no session (a broker that restarted
without its store lost its retained messages) the firing ones are sent again.

Alerts need the telemetry sampler (``[telemetry] enabled``); without ``[mqtt]``
they are logged and in /metrics only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from agent.context import AUDIT, CONFIG, LIVE, METRICS, MODELS, MQTT
from agent.fleet.telemetry import PUBLISHER, SAMPLER
from agent.fleet.updates import UPDATES
from agent.metrics import Metrics, watch_alerts
from runtime.energy.sampler import Sampler
from runtime.files import write_file_atomic
from runtime.registry import ModelRegistry, ModelState
from runtime.scheduling.latency import LATENCY_BUCKETS_S
from sync.alerts.engine import AlertBook, CounterWindow, HistogramWindow, Transition, quantile
from sync.alerts.payload import alert_payload
from sync.alerts.settings import RULE_NAMES, AlertSettings, RuleSettings
from sync.update_health import Health

if TYPE_CHECKING:  # paho, the outbox's sqlite3 and python-tuf load only with [mqtt] / [updates]
    from sync.mqtt import ConnectInfo, MqttLink
    from sync.telemetry import TelemetryPublisher
    from sync.updates import UpdateService

log = logging.getLogger(__name__)

#: Routes that are not API requests (probes, scrapes): left out of the error rate.
NOT_API = frozenset({"/metrics", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
#: How an update job ends when it is refused.
REFUSED_JOBS = frozenset({"rejected", "failed", "rolled-back"})


def http_request_counts(metrics: Metrics) -> tuple[float, float]:
    """(API requests, those answered 5xx) since the agent started, from the HTTP middleware's counter."""
    total = errors = 0.0
    for family in metrics.requests.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total") or sample.labels.get("route") in NOT_API:
                continue
            total += sample.value
            if sample.labels.get("status", "").startswith("5"):
                errors += sample.value
    return total, errors


class UpdateRefusals:
    """Wall times of update refusals: jobs that ended rejected, failed or rolled back, and looks
    at the hub that ended refused. Seeded from the journal, so a restart keeps the window."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, Any]] = set()
        self.times: deque[float] = deque()

    def scan(self, service: UpdateService) -> None:
        for model, last in service.journal.data.last.items():
            key = (model, last.get("job"))
            if last.get("state") in REFUSED_JOBS and key not in self._seen:
                self._seen.add(key)
                self.times.append(float(last.get("at") or time.time()))
        health = service.health
        if health.state is Health.REFUSED:
            key = ("hub", health.last_check or health.since)
            if key not in self._seen:
                self._seen.add(key)
                self.times.append(key[1])

    def within(self, wall: float, window_s: float) -> int:
        while self.times and self.times[0] < wall - 86_400 * 7:  # the longest window allowed
            self.times.popleft()
        return sum(1 for t in self.times if t >= wall - window_s)


class Readings:
    """One value per rule from what the agent keeps; windows over its cumulative counters."""

    def __init__(self, models: ModelRegistry, sampler: Sampler, metrics: Metrics,
                 publisher: Callable[[], TelemetryPublisher | None], link: Callable[[], MqttLink | None],
                 updates: Callable[[], UpdateService | None]) -> None:
        self.models, self.sampler, self.metrics = models, sampler, metrics
        self._publisher, self._link, self._updates = publisher, link, updates
        self._requests, self._errors, self._drops = CounterWindow(), CounterWindow(), CounterWindow()
        self._ttft: dict[str, HistogramWindow] = {}
        self.refusals = UpdateRefusals()
        #: audit records lost so far (agent/fleet/audit.py), when the audit log is on
        self.audit_dropped: Callable[[], int] | None = None
        self._audit_drops = CounterWindow()

    def read(self, settings: AlertSettings, now: float, wall: float) -> dict[str, float | None]:
        system = self.sampler.system
        values: dict[str, float | None] = dict.fromkeys(RULE_NAMES)
        if system is not None:
            if system.temperatures_c:
                values["temperature"] = max(system.temperatures_c.values())
            if system.memory_total_bytes:
                values["memory"] = 100.0 * system.memory_used_bytes / system.memory_total_bytes
            if system.disk_used_bytes + system.disk_free_bytes:
                values["disk"] = 100.0 * system.disk_used_bytes / (system.disk_used_bytes + system.disk_free_bytes)
        energy = self.sampler.energy
        if energy is not None:
            values["energy_source_lost"] = float(sum(1 for s in energy.sources if s.used and not s.available))
        values["model_failed"] = float(sum(1 for s in self.models.statuses() if s.state is ModelState.FAILED))
        values["error_rate"] = self._error_rate(settings, now)
        values["ttft_p95"] = self._ttft_p95(settings, now)
        values["outbox_drops"] = self._outbox_drops(settings, now)
        if self.audit_dropped is not None:
            self._audit_drops.add(now, self.audit_dropped())
            values["audit_dropping"] = self._audit_drops.increase(now, settings.audit_dropping.window_s)
        service = self._updates()
        if service is not None:
            self.refusals.scan(service)
            values["update_refusals"] = float(self.refusals.within(wall, settings.update_refusals.window_s))
        return values

    def _error_rate(self, settings: AlertSettings, now: float) -> float | None:
        total, errors = http_request_counts(self.metrics)
        self._requests.add(now, total)
        self._errors.add(now, errors)
        rule = settings.error_rate
        requests = self._requests.increase(now, rule.window_s)
        if requests < rule.min_requests:
            return None
        return 100.0 * self._errors.increase(now, rule.window_s) / requests

    def _ttft_p95(self, settings: AlertSettings, now: float) -> float | None:
        rule = settings.ttft_p95
        worst = None
        for name, usage in self.models.usage().items():
            hist = usage.time_to_first_token
            window = self._ttft.setdefault(name, HistogramWindow())
            window.add(now, [count for _, count in hist.cumulative()])
            counts = window.increase(now, rule.window_s)
            if not counts or counts[-1] < rule.min_requests:
                continue
            p95 = quantile(0.95, hist.bounds or LATENCY_BUCKETS_S, counts)
            if p95 is not None and (worst is None or p95 > worst):
                worst = p95
        return worst

    def _outbox_drops(self, settings: AlertSettings, now: float) -> float | None:
        dropped = 0
        publisher = self._publisher()
        if publisher is not None:
            stats = publisher.last_stats
            dropped += stats.dropped + stats.refused + stats.messages_dropped + publisher.records_lost
        link = self._link()
        if link is not None:
            dropped += link.status.send.dropped
        self._drops.add(now, dropped)
        return self._drops.increase(now, settings.outbox_drops.window_s)


class Alerts:
    """The rules' state, what evaluating them does, and where firing alerts are kept."""

    def __init__(self, settings: Callable[[], AlertSettings], readings: Readings,
                 publisher: Callable[[], TelemetryPublisher | None], link: MqttLink | None, device: str, group: str,
                 store: Path) -> None:
        """`settings`: the ``[alerts]`` section in force now (a reload changes it)."""
        self.settings = settings
        self.readings = readings
        self.book = AlertBook(RULE_NAMES)
        self._publisher = publisher
        self._link = link
        self._device, self._group = device, group
        self._store = store
        self._store_failed = False

    def rules(self) -> dict[str, RuleSettings]:
        settings = self.settings()
        rules = settings.rules()
        if not settings.enabled:  # switched off by a reload: what fires resolves
            rules = {rule: dataclasses.replace(r, enabled=False) for rule, r in rules.items()}
        return rules

    def gauges(self) -> Iterator[tuple[str, str, bool]]:
        """(rule, severity, firing) for every enabled rule: what /metrics shows."""
        for rule, rule_settings in self.rules().items():
            tracker = self.book.trackers[rule]
            if rule_settings.enabled or tracker.firing:
                yield rule, tracker.severity if tracker.firing else rule_settings.severity, tracker.firing

    async def restore(self) -> None:
        """Take back the alerts that were firing when the agent last stopped."""
        try:
            kept = orjson.loads(await asyncio.to_thread(self._store.read_bytes)).get("firing", {})
        except FileNotFoundError:
            return
        except (OSError, orjson.JSONDecodeError, AttributeError) as exc:
            log.warning("alerts: %s cannot be read (%s): starting with none firing", self._store, exc)
            return
        for rule, entry in kept.items():
            tracker = self.book.trackers.get(rule)
            if tracker is not None and isinstance(entry, dict) and isinstance(entry.get("since"), (int, float)):
                tracker.restore_firing(float(entry["since"]), str(entry.get("severity", "warning")))
                tracker.value = entry.get("value")
        if self.book.firing():
            log.info("alerts: still firing from before the restart: %s",
                     ", ".join(t.rule for t in self.book.firing()))

    async def evaluate(self) -> list[Transition]:
        now, wall = time.monotonic(), time.time()
        values = self.readings.read(self.settings(), now, wall)
        transitions = self.book.evaluate(self.rules(), values, now, wall)
        for t in transitions:
            payload = alert_payload(t, self._device, self._group)
            if t.state == "firing":
                log.warning("alert %s firing: %s", t.rule, payload["message"],
                            extra={"alert": t.rule, "severity": t.severity})
            else:
                log.info("alert %s resolved: %s", t.rule, payload["message"], extra={"alert": t.rule})
            await self._publish(t.rule, payload)
        if transitions:
            await self._save()
        return transitions

    async def _publish(self, rule: str, payload: dict[str, Any]) -> None:
        publisher = self._publisher()
        if publisher is None or self._link is None:
            return
        topic = self._link.topics.alert(rule)
        firing = payload["state"] == "firing"
        await publisher.send_message(topic, orjson.dumps(payload), retain=firing)
        if not firing:  # what is retained is what fires: clear the firing message
            await publisher.send_message(topic, b"", retain=True)

    async def on_connect(self, info: ConnectInfo) -> None:
        """A broker without our session may have lost the retained firing messages: send them again."""
        if info.session_present:
            return
        rules = self.rules()
        for tracker in self.book.firing():
            rule = rules[tracker.rule]
            t = Transition(tracker.rule, "firing", tracker.severity, tracker.value, rule.threshold,
                           rule.resolve_at, tracker.firing_since or time.time(), time.time())
            await self._publish(tracker.rule, alert_payload(t, self._device, self._group))

    async def _save(self) -> None:
        data = {"firing": {t.rule: {"since": t.firing_since, "severity": t.severity, "value": t.value}
                           for t in self.book.firing()}}
        try:
            await asyncio.to_thread(write_file_atomic, self._store, orjson.dumps(data))
        except OSError as exc:
            if not self._store_failed:
                log.warning("alerts: cannot keep the firing alerts in %s (%s): after a restart their retained "
                            "messages stay until they fire and resolve again", self._store, exc.strerror)
            self._store_failed = True
        else:
            self._store_failed = False


ALERTS = web.AppKey("alerts", Alerts)


async def alerts_ctx(app: web.Application) -> AsyncIterator[None]:
    """After telemetry (its sampler and outbox) and the update service; stopped before them."""
    config = app[CONFIG]
    if not config.alerts.enabled or SAMPLER not in app:
        if config.alerts.enabled:
            log.info("alerts: off, since they read the telemetry sampler ([telemetry] enabled = false)")
        yield
        return
    link = app.get(MQTT)
    readings = Readings(app[MODELS], app[SAMPLER], app[METRICS], lambda: app.get(PUBLISHER), lambda: link,
                        lambda: app.get(UPDATES))
    readings.audit_dropped = lambda: audit.dropped if (audit := app.get(AUDIT)) is not None else 0
    alerts = Alerts(lambda: app[LIVE].config.alerts, readings, lambda: app.get(PUBLISHER), link,
                    config.mqtt.device_id, config.mqtt.group, Path(config.state_dir) / "alerts.json")
    await alerts.restore()
    app[ALERTS] = alerts
    watch_alerts(app[METRICS], alerts.gauges)
    if link is not None:
        link.add_connect_hook(alerts.on_connect)
    task = asyncio.create_task(_evaluate_forever(alerts), name="alerts")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _evaluate_forever(alerts: Alerts) -> None:
    while True:
        try:
            await alerts.evaluate()
        except asyncio.CancelledError:
            raise
        except Exception:  # one bad reading must not end alerting
            log.exception("alerts: evaluation failed")
        await asyncio.sleep(alerts.settings().interval_s)
