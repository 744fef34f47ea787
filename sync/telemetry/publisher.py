"""Store and forward: every record goes to the outbox first, then to the broker in order.

Two tasks. The ticker builds a record every `interval_s` and appends it to the
outbox (so a record exists on disk before anyone tries to send it). The sender
waits for the link, takes the oldest records in batches, publishes them QoS 1
in order (paho keeps one connection's order) and removes each from the outbox
once the broker acknowledged it. A broker outage just makes the outbox grow (up
to its bound, counting what falls off); a restart resends whatever was not yet
acknowledged — the only duplicates, recognisable by `seq`.

When the disk refuses the outbox (full, read-only), telemetry goes on without it:
`StorageHealth` says why (in every record, /metrics and /readyz), one log line says
so when it starts and one when it clears; each record is then sent straight to the
broker while the link is up, and counted as lost while it is not (the count goes to
the outbox once it can be written, so it survives restarts). Sequence numbers are
kept in memory too, so a lost record is a gap in `seq`, never a reused number.
Records acknowledged while the outbox cannot delete them are remembered and not
sent again.

Messages with a topic of their own (alerts: `send_message`) take the same path:
stored in the outbox first (their own table, their own order), sent by the same
sender before the records waiting, removed once acknowledged. They are few and
each one is a state change, so they are not held behind a backlog of records.

On stop (SIGTERM) one last record is stored, so the energy and tokens of the
last partial interval are not lost, and the sender gets `flush_s` to hand the
outbox to the broker; what it cannot send stays on disk for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from ..errors import LinkClosedError, PublishRefusedError, SyncError
from .outbox import Outbox, OutboxMessage, OutboxStats, OutboxStorageError

if TYPE_CHECKING:  # the link's module imports paho: only an agent with [mqtt] loads it
    from ..mqtt import MqttLink

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class StorageHealth:
    """Whether records can be stored now, and what was lost while they could not."""

    #: why the outbox cannot be written now (SQLite's or the OS's reason); None while it works
    error: str | None = None
    #: time.time() when storing started failing
    since: float | None = None
    #: records neither stored nor sent since storing failed, not yet added to the outbox's `lost`
    lost_unsaved: int = 0
    #: records sent straight to the broker because they could not be stored (this run)
    sent_unstored: int = 0

    def lost(self, stats: OutboxStats) -> int:
        """Every record lost: those the outbox counted, and those still waiting to be counted there."""
        return stats.lost + self.lost_unsaved


#: Build one record: (seq, outbox stats, records published so far, storage health) -> payload
RecordBuilder = Callable[[int, OutboxStats, int, StorageHealth], dict[str, Any]]


class TelemetryPublisher:
    def __init__(self, link: MqttLink, outbox: Outbox, build: RecordBuilder, interval_s: float,
                 batch: int = 50) -> None:
        self.link = link
        self.outbox = outbox
        self.build = build
        self.interval_s = interval_s
        self.batch = batch
        #: records the broker acknowledged since this process started
        self.published = 0
        self.storage = StorageHealth()
        #: the outbox's figures as last read (what a record, /metrics and /readyz show)
        self.last_stats = OutboxStats(0, 0, 0, 0)
        self._seq: int | None = None
        #: records up to this seq are acknowledged (and deleted, unless `_undeleted`)
        self._acked_through = 0
        self._undeleted = False
        #: messages up to this id are acknowledged (deleted unless the disk refused)
        self._messages_acked = 0
        self._io = ThreadPoolExecutor(1, thread_name_prefix="telemetry-outbox")
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._direct: set[asyncio.Task[None]] = set()
        #: the ticker's record being made (see `_tick`)
        self._recording: asyncio.Task[int] | None = None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._tick(), name="telemetry-ticker"),
                       asyncio.create_task(self._send(), name="telemetry-sender")]
        self.link.add_connect_hook(self._on_connect)

    async def stop(self, flush_s: float = 2.0) -> None:
        """Stop ticking, store a last record, give the sender `flush_s` to empty the outbox."""
        if self._tasks:
            ticker, sender = self._tasks
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            if self._recording is not None and not self._recording.done():
                try:  # the record whose seq is taken is stored before the last one
                    await self._recording
                except Exception:
                    log.exception("telemetry: could not store a record")
            try:
                await self.record_now(final=True)
            except Exception:  # the records already stored still count
                log.exception("telemetry: could not store the last record")
            if self.link.connected:
                with contextlib.suppress(TimeoutError, OutboxStorageError):
                    async with asyncio.timeout(flush_s):
                        while not sender.done() and (self._direct or await self._unsent()):
                            await asyncio.sleep(0.02)
        for task in [*self._tasks, *self._direct]:
            task.cancel()
        for task in [*self._tasks, *self._direct]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.storage.lost_unsaved:  # one last try to keep the count
            with contextlib.suppress(OutboxStorageError):
                await self._call(self.outbox.add_lost, self.storage.lost_unsaved)
        await self._call(self.outbox.close)
        self._io.shutdown(wait=True)

    async def _unsent(self) -> bool:
        """Whether the outbox holds a record or message the broker has not acknowledged."""
        return bool(await self._call(self.outbox.peek, 1, self._acked_through)
                    or await self._call(self.outbox.peek_messages, 1, self._messages_acked))

    async def stats(self) -> OutboxStats:
        return await self._call(self.outbox.stats)

    @property
    def records_lost(self) -> int:
        return self.storage.lost(self.last_stats)

    async def record_now(self, final: bool = False) -> int:
        """Build and store one record now (or, when the disk refuses it, send it directly or count
        it lost); returns its seq. `final` marks the last of a run."""
        if self._seq is None:
            try:
                self._seq = await self._call(self.outbox.next_seq)
            except OutboxStorageError as exc:
                self._storage_failed(exc)
                self._seq = 1  # the outbox could not even be opened: it holds no numbers yet
        seq = self._seq
        self._seq += 1
        with contextlib.suppress(OutboxStorageError):  # when unreadable, the last figures stand
            self.last_stats = await self._call(self.outbox.stats)
        record = self.build(seq, self.last_stats, self.published, self.storage)
        if final:
            record["final"] = True
        payload = orjson.dumps(record)
        try:
            fell = await self._call(self.outbox.append, seq, payload)
        except OutboxStorageError as exc:
            self._storage_failed(exc)
            self._send_unstored(seq, payload)
            return seq
        await self._storage_works()
        if fell:
            log.warning("telemetry: outbox full (%d records): %d oldest dropped and counted",
                        self.outbox.max_records, fell)
        self._wake.set()
        return seq

    async def send_message(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Store a message for `topic` (QoS 1) to be sent in order with the other messages, before
        the records waiting; when the disk refuses it, send it now if connected, else count it lost."""
        try:
            fell = await self._call(self.outbox.append_message, topic, payload, retain)
        except OutboxStorageError as exc:
            self._storage_failed(exc)
            if not self.link.connected:
                self.storage.lost_unsaved += 1
                return
            task = asyncio.create_task(self._publish_message_unstored(topic, payload, retain),
                                       name="outbox-message-unstored")
            self._direct.add(task)
            task.add_done_callback(self._direct.discard)
            return
        if fell:
            log.warning("outbox: %d oldest message(s) dropped past the bound of %d", fell, self.outbox.max_messages)
        self._wake.set()

    async def _publish_message_unstored(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            await self.link.publish(topic, payload, qos=1, retain=retain)
        except SyncError as exc:  # refused, or the link stopped first
            log.error("outbox: a message on %s was neither stored nor sent: %s", topic, exc)
            self.storage.lost_unsaved += 1

    def _storage_failed(self, exc: OutboxStorageError) -> None:
        if self.storage.error is None:
            self.storage.since = time.time()
            log.error("telemetry: cannot store records (%s); sending them straight to the broker while it is "
                      "connected, counting the rest as lost (edgefleet_telemetry_records_lost_total)", exc)
        self.storage.error = str(exc)

    async def _storage_works(self) -> None:
        if self.storage.error is None:
            return
        lost = self.storage.lost_unsaved
        try:
            if lost:
                await self._call(self.outbox.add_lost, lost)
        except OutboxStorageError:
            return  # not quite yet: the next record tries again
        self.storage.lost_unsaved = 0
        with contextlib.suppress(OutboxStorageError):
            self.last_stats = await self._call(self.outbox.stats)
        log.warning("telemetry: storing records again after %.0fs (%d lost, %d sent without being stored)",
                    time.time() - (self.storage.since or time.time()), lost, self.storage.sent_unstored)
        self.storage.error = self.storage.since = None

    def _send_unstored(self, seq: int, payload: bytes) -> None:
        """A record the outbox refused: hand it to the broker now if connected, else count it lost."""
        if not self.link.connected:
            self.storage.lost_unsaved += 1
            return
        self.storage.sent_unstored += 1
        task = asyncio.create_task(self._publish_unstored(seq, payload), name=f"telemetry-unstored-{seq}")
        self._direct.add(task)
        task.add_done_callback(self._direct.discard)

    async def _publish_unstored(self, seq: int, payload: bytes) -> None:
        try:
            await self.link.publish(self.link.topics.telemetry, payload, qos=1)
        except PublishRefusedError as exc:
            log.error("telemetry: record %d refused and dropped: %s", seq, exc)
            self.storage.lost_unsaved += 1
        except SyncError:  # the link stopped first: nobody holds it any more
            self.storage.lost_unsaved += 1
        else:
            self.published += 1

    async def _on_connect(self, info: object) -> None:
        self._wake.set()

    async def _tick(self) -> None:
        while True:
            # A record takes its seq first and is stored a few awaits later: cancelled in
            # between (the agent stopping), the number would be a gap in `seq`, read as a lost
            # record. So the record is made in a task of its own, which `stop` lets finish.
            self._recording = asyncio.create_task(self.record_now(), name="telemetry-record")
            try:
                await asyncio.shield(self._recording)
            except asyncio.CancelledError:
                raise
            except Exception:  # a record that cannot be built must not stop the next ones
                log.exception("telemetry: could not store a record")
            await asyncio.sleep(self.interval_s)

    async def _send(self) -> None:
        while True:
            await self.link.wait_connected()
            self._wake.clear()
            if self._undeleted:  # acknowledged earlier, not yet deleted: the disk refused
                await self._forget(self._acked_through)
            try:
                messages = await self._call(self.outbox.peek_messages, self.batch, self._messages_acked)
                if messages:
                    if not await self._send_messages(messages):
                        return
                    continue
                records = await self._call(self.outbox.peek, self.batch, self._acked_through)
            except OutboxStorageError as exc:  # cannot even read it: look again in a while
                self._storage_failed(exc)
                await asyncio.sleep(self.interval_s)
                continue
            records = _within(records, self.link.settings.send_queue_max_bytes)
            if not records:
                await self._wake.wait()
                continue
            # started in order, so paho queues them in order; each returns on its PUBACK
            sends = [asyncio.ensure_future(self.link.publish(self.link.topics.telemetry, payload, qos=1))
                     for _, payload in records]
            acked = None
            try:
                for (seq, _), send in zip(records, sends, strict=True):
                    try:
                        await send
                    except PublishRefusedError as exc:
                        log.error("telemetry: record %d refused and dropped: %s", seq, exc)
                        if acked is not None:
                            await self._forget(acked)
                        await self._refuse(seq)
                        continue
                    acked = seq
                    self.published += 1
            except LinkClosedError:
                return
            except SyncError as exc:  # paho would not take it (its queue full, …): the records stay
                log.warning("telemetry: not sent (%s); trying again in %gs", exc, self.interval_s)
                await asyncio.sleep(self.interval_s)
            finally:
                for send in sends:
                    send.cancel()
                if acked is not None:
                    await asyncio.shield(self._forget(acked))

    async def _send_messages(self, messages: list[OutboxMessage]) -> bool:
        """Publish stored messages in order, forget those the broker acknowledged (or refused:
        logged and dropped); False when the link stopped."""
        sends = [asyncio.ensure_future(self.link.publish(m.topic, m.payload, qos=1, retain=m.retain))
                 for m in messages]
        done = None
        try:
            for message, send in zip(messages, sends, strict=True):
                try:
                    await send
                except PublishRefusedError as exc:
                    log.error("outbox: the broker refused a message on %s, dropped: %s", message.topic, exc)
                done = message.id
        except LinkClosedError:
            return False
        except SyncError as exc:  # the messages stay in the outbox
            log.warning("outbox: not sent (%s); trying again in %gs", exc, self.interval_s)
            await asyncio.sleep(self.interval_s)
        finally:
            for send in sends:
                send.cancel()
            if done is not None:
                self._messages_acked = max(self._messages_acked, done)
                with contextlib.suppress(OutboxStorageError):  # sent again only if this process restarts
                    await asyncio.shield(self._call(self.outbox.remove_messages_through, done))
        return True

    async def _forget(self, seq: int) -> None:
        """The broker has every record through `seq`: delete them, or remember it if the disk refuses."""
        self._acked_through = max(self._acked_through, seq)
        try:
            await self._call(self.outbox.remove_through, self._acked_through)
        except OutboxStorageError as exc:
            self._storage_failed(exc)
            self._undeleted = True
        else:
            self._undeleted = False

    async def _refuse(self, seq: int) -> None:
        try:
            await self._call(self.outbox.refuse, seq)
        except OutboxStorageError as exc:
            self._storage_failed(exc)
            self._acked_through = max(self._acked_through, seq)  # not sent again
            self._undeleted = True


def _within(records: list[tuple[int, bytes]], max_bytes: int) -> list[tuple[int, bytes]]:
    """The first records whose payloads fit in `max_bytes` (at least one): what one batch may
    hold in paho's memory if the broker goes away in the middle of it."""
    total = 0
    for i, (_, payload) in enumerate(records):
        total += len(payload)
        if total > max_bytes and i > 0:
            return records[:i]
    return records
