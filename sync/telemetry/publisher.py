"""Store and forward: every record goes to the outbox first, then to the broker in order.

Two tasks. The ticker builds a record every `interval_s` and appends it to the
outbox (so a record exists on disk before anyone tries to send it). The sender
waits for the link, takes the oldest records in batches, publishes them QoS 1
in order (paho keeps one connection's order) and removes each from the outbox
once the broker acknowledged it. A broker outage just makes the outbox grow (up
to its bound, counting what falls off); a restart resends whatever was not yet
acknowledged — the only duplicates, recognisable by `seq`.

On stop (SIGTERM) one last record is stored, so the energy and tokens of the
last partial interval are not lost, and the sender gets `flush_s` to hand the
outbox to the broker; what it cannot send stays on disk for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import orjson

from ..errors import LinkClosedError, PublishRefusedError
from ..mqtt import MqttLink
from .outbox import Outbox, OutboxStats

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Build one record: (seq, outbox stats, records published so far) -> payload
RecordBuilder = Callable[[int, OutboxStats, int], dict[str, Any]]


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
        self._io = ThreadPoolExecutor(1, thread_name_prefix="telemetry-outbox")
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

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
            try:
                await self.record_now(final=True)
            except Exception:  # the records already stored still count
                log.exception("telemetry: could not store the last record")
            if self.link.connected:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(flush_s):
                        while (await self.stats()).queued and not sender.done():
                            await asyncio.sleep(0.02)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._call(self.outbox.close)
        self._io.shutdown(wait=True)

    async def stats(self) -> OutboxStats:
        return await self._call(self.outbox.stats)

    async def record_now(self, final: bool = False) -> int:
        """Build and store one record now; returns its seq. `final` marks the last of a run."""
        seq = await self._call(self.outbox.next_seq)
        stats = await self._call(self.outbox.stats)
        record = self.build(seq, stats, self.published)
        if final:
            record["final"] = True
        payload = orjson.dumps(record)
        fell = await self._call(self.outbox.append, seq, payload)
        if fell:
            log.warning("telemetry: outbox full (%d records): %d oldest dropped and counted",
                        self.outbox.max_records, fell)
        self._wake.set()
        return seq

    async def _on_connect(self, info: object) -> None:
        self._wake.set()

    async def _tick(self) -> None:
        while True:
            try:
                await self.record_now()
            except asyncio.CancelledError:
                raise
            except Exception:  # a record that cannot be built must not stop the next ones
                log.exception("telemetry: could not store a record")
            await asyncio.sleep(self.interval_s)

    async def _send(self) -> None:
        while True:
            await self.link.wait_connected()
            self._wake.clear()
            records = await self._call(self.outbox.peek, self.batch)
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
                            await self._call(self.outbox.remove_through, acked)
                        await self._call(self.outbox.refuse, seq)
                        continue
                    acked = seq
                    self.published += 1
            except LinkClosedError:
                return
            finally:
                for send in sends:
                    send.cancel()
                if acked is not None:
                    await asyncio.shield(self._call(self.outbox.remove_through, acked))
