"""The audit log as one of the app's cleanup contexts: what it records, and where it goes.

On unless ``[audit] enabled = false``. It opens ``<state_dir>/audit/audit.log``
(security/audit.py) with the device key (``<state_dir>/device-key.pem``, security/device_key.py):
at start the key file is only checked (without cryptography: a bad one is logged then, and
`edgefleet doctor` names it), and it is loaded, or made, at the first checkpoint — unless MQTT
is on, whose birth message carries the key's public half, and then at start. A key that cannot
sign loses that checkpoint, counted and alerted (``audit_dropping``) like a record the disk
refuses; serving goes on. It puts the log under ``app[AUDIT]`` for whoever records admin calls and failed
authentications (the request gate calls ``app.get(AUDIT).record(...)``), and records
every signed-update transition itself (`UpdateService.on_transition`): actor ``hub``
for a step of a signed update, ``local`` for the operator's rollback.

Each line, once on disk, is forwarded on ``{prefix}/devices/{id}/audit`` through the
telemetry outbox (`TelemetryPublisher.send_message`), so the hub holds a copy that
survives a broker outage and can verify it (docs/mqtt.md#audit). It is the last
context: it stops first, sealing the log with a checkpoint while the outbox still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from agent.context import AUDIT, CONFIG, METRICS, MQTT
from agent.fleet.telemetry import PUBLISHER
from agent.fleet.updates import UPDATES
from agent.metrics import watch_audit
from security.audit import AuditLog
from security.device_key import DeviceKey

log = logging.getLogger(__name__)

#: update job states and what they mean for the record's outcome
_OUTCOMES = {"rejected": "denied", "failed": "error"}
#: how long the last records get to reach the outbox at shutdown
FLUSH_S = 2.0


def audit_topic(prefix: str, device: str) -> str:
    return f"{prefix}/devices/{device}/audit"


def device_key_field(app: web.Application) -> dict[str, str]:
    """The birth message's ``device_key`` (agent/fleet/link.py), once the audit log holds the key."""
    from security.audit_chain import public_key_text

    audit = app.get(AUDIT)
    key = audit.key.loaded if audit is not None and isinstance(audit.key, DeviceKey) else None
    return {"device_key": public_key_text(key.public_key())} if key is not None else {}


def record_transition(audit: AuditLog, payload: dict[str, Any]) -> None:
    """One update transition (edgefleet.update/1) as an audit record."""
    state = str(payload.get("state"))
    code = payload.get("code")
    operator = code == "operator"
    outcome = _OUTCOMES.get(state, "error" if state == "rolled-back" and not operator else "ok")
    model, version = payload.get("model"), payload.get("version")
    target = f"{model}@{version}" if model else "desired-state"
    audit.record("local" if operator else "hub", f"update.{state}", target, outcome, job=payload.get("job"),
                 code=code, message=payload.get("message"), from_version=payload.get("from_version"),
                 update_seq=payload.get("seq"))


async def audit_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    settings = config.audit
    if not settings.enabled:
        yield
        return
    state_dir = Path(config.state_dir)
    key = DeviceKey(state_dir)
    problem = await asyncio.to_thread(key.precheck)
    if problem is not None:
        log.error("audit: the device key cannot sign checkpoints: %s: records are chained but not sealed until "
                  "it is fixed (edgefleet doctor checks it)", problem)
    elif config.mqtt.enabled:  # the birth message carries its public half: loaded (or made) now
        try:
            await asyncio.to_thread(key.get)
        except (OSError, ValueError) as exc:
            log.error("audit: the device key cannot sign checkpoints: %s", exc)
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[bytes] = asyncio.Queue()

    def on_line(line: bytes) -> None:  # the writer thread
        with contextlib.suppress(RuntimeError):  # the loop is gone: the file has it
            loop.call_soon_threadsafe(lines.put_nowait, line)

    audit = AuditLog(settings.directory(state_dir), config.mqtt.device_id, key, settings, on_line=on_line)
    try:
        await asyncio.to_thread(audit.open)
    except OSError as exc:  # the directory cannot be made: records are counted as they are dropped
        log.error("audit: %s cannot be opened (%s): records are dropped and counted until it can",
                  audit.path, exc.strerror)
    app[AUDIT] = audit
    watch_audit(app[METRICS], lambda: audit.dropped, lambda: audit.written)
    link = app.get(MQTT)
    topic = audit_topic(config.mqtt.topic_prefix, config.mqtt.device_id)
    forwarder = asyncio.create_task(_forward(app, lines, topic), name="audit-forward")
    service = app.get(UPDATES)
    if service is not None:
        service.on_transition(lambda payload: record_transition(audit, payload))
    if link is not None and link.connected:  # the birth sent before the key was known: again, with it
        with contextlib.suppress(Exception):
            await link.publish_state()
    try:
        yield
    finally:
        await asyncio.to_thread(audit.close)  # seals the log with a checkpoint
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FLUSH_S):
                await lines.join()
        forwarder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await forwarder


async def _forward(app: web.Application, lines: asyncio.Queue[bytes], topic: str) -> None:
    """Each line into the outbox, in order (nothing to do without MQTT and telemetry)."""
    while True:
        line = await lines.get()
        try:
            publisher = app.get(PUBLISHER)
            if publisher is not None:
                await publisher.send_message(topic, line.rstrip(b"\n"))
        except asyncio.CancelledError:
            raise
        except Exception:  # one record not forwarded; the file still has it
            log.exception("audit: a record was not forwarded")
        finally:
            lines.task_done()
