"""One sender per endpoint: post the queue's oldest event until it is delivered or given up.

An endpoint's events go out one at a time, in order, so a receiver sees them in the order
they happened; each endpoint has its own task and its own queue rows, so a dead endpoint
only ever waits for itself. Outcomes of one attempt:

- 2xx: delivered (the row is deleted);
- 408, 429, 5xx, a timeout, a refused or broken connection: tried again after a backoff
  (from `retry_min_s`, doubling per failure in a row, up to `retry_max_s`, the second half
  of each wait random so that many hubs do not come back together), or after the
  response's ``Retry-After`` (seconds or an HTTP date, at most an hour) when it has one;
- any other status (4xx, 3xx: the receiver refused this event or the URL is wrong): given
  up, logged and counted, and the next event goes.

Nothing is given up for age: the queue's bound (store.py) decides what an endpoint that
stays away loses. A small loop rather than a retry library: the rules above, Retry-After
above all, are the whole policy, and none is in the project's dependencies (docs/dependencies.md).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from . import signing
from .config import Endpoint
from .store import Queued, WebhookStore

log = logging.getLogger("edgefleet.hub.webhooks")
#: the longest Retry-After honoured (a receiver asking for days is asking for the bound to decide)
RETRY_AFTER_MAX_S = 3600.0
USER_AGENT = "edgefleet-hub-webhooks/1"
#: a queue write the disk refused is tried again after this long
DISK_RETRY_S = 5.0
T = TypeVar("T")
OnDb = Callable[..., Awaitable[Any]]


@dataclass
class Attempt:
    outcome: str  # delivered | retry | given_up
    detail: str
    retry_after: float | None = None


def classify(status: int, retry_after: str | None, now: float) -> Attempt:
    if 200 <= status < 300:
        return Attempt("delivered", f"HTTP {status}")
    if status in (408, 429) or status >= 500:
        return Attempt("retry", f"HTTP {status}", parse_retry_after(retry_after, now))
    return Attempt("given_up", f"HTTP {status}")


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or HTTP-date), capped."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_MAX_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when.timestamp() - now), RETRY_AFTER_MAX_S)


def backoff(failures: int, low: float, high: float, rng: random.Random) -> float:
    """The wait after `failures` failures in a row: low·2^(n-1) capped at high, its second half random."""
    ceiling = min(high, low * 2 ** min(failures - 1, 60))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


@dataclass
class Sender:
    endpoint: Endpoint
    store: WebhookStore
    db: OnDb
    session: aiohttp.ClientSession
    #: set by the service after it queued events for this endpoint
    wake: asyncio.Event
    #: called after every attempt (the service publishes its status)
    changed: Callable[[], None] = lambda: None
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0
    failing_since: float | None = None
    last_error: str | None = None
    last_delivered_at: float | None = None

    async def run(self) -> None:
        """Until cancelled: post, wait, post again. A cancelled attempt leaves its event queued;
        a queue the disk refuses is tried again (an event posted but not yet marked is posted
        again: the receiver deduplicates)."""
        while True:
            try:
                await self._once()
            except sqlite3.Error as exc:
                log.error("webhook %s: the queue %s: %s; trying again in %gs", self.endpoint.name, self.store.path,
                          exc, DISK_RETRY_S)
                await asyncio.sleep(DISK_RETRY_S)

    async def _once(self) -> None:
        """One turn: wait for an event, or post the oldest and wait as its outcome says."""
        self.wake.clear()
        item = await self.db(self.store.head, self.endpoint.name)
        if item is None:
            await self.wake.wait()
            return
        attempt = await self.attempt(item)
        if attempt.outcome == "retry":
            await self.db(self.store.failed_attempt, self.endpoint.name, item.seq)
            self._failed(item, attempt)
            self.changed()
            delay = attempt.retry_after if attempt.retry_after is not None else \
                backoff(self.failures, self.endpoint.retry_min_s, self.endpoint.retry_max_s, self.rng)
            await asyncio.sleep(delay)
            return
        await self.db(self.store.finish, self.endpoint.name, item.seq, attempt.outcome)
        if attempt.outcome == "given_up":
            self.last_error = f"{attempt.detail} for event {item.event_id} ({item.kind}): given up"
            log.warning("webhook %s: %s answered %s to event %s (%s): given up (not retried; fix the "
                        "receiver or the url)", self.endpoint.name, self.endpoint.url, attempt.detail,
                        item.event_id, item.kind)
        else:
            if self.failures:
                log.info("webhook %s: delivered again after %d failed attempt(s)", self.endpoint.name,
                         self.failures)
            self.failures, self.failing_since = 0, None
            self.last_delivered_at = time.time()
        self.changed()

    async def attempt(self, item: Queued) -> Attempt:
        """One POST of `item`, signed now."""
        headers = signing.headers(self.endpoint.secret, item.kind, item.event_id, item.body)
        headers["User-Agent"] = USER_AGENT
        try:
            async with self.session.post(self.endpoint.url, data=item.body, headers=headers, allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(total=self.endpoint.timeout_s)) as resp:
                await resp.content.read(64 * 1024)  # the receiver's answer is not ours to keep
                return classify(resp.status, resp.headers.get("Retry-After"), time.time())
        except TimeoutError:
            return Attempt("retry", f"no answer within {self.endpoint.timeout_s:g}s")
        except aiohttp.ClientError as exc:
            return Attempt("retry", f"{type(exc).__name__}: {exc}")

    def _failed(self, item: Queued, attempt: Attempt) -> None:
        self.failures += 1
        self.last_error = attempt.detail
        if self.failing_since is None:
            self.failing_since = time.time()
        # the first failure of a streak, then at doublings: a dead endpoint fills no journal
        if self.failures & (self.failures - 1) == 0:
            log.warning("webhook %s: %s: %s (event %s, %d failed attempt(s) in a row; retrying%s)",
                        self.endpoint.name, self.endpoint.url, attempt.detail, item.event_id, self.failures,
                        f" after Retry-After {attempt.retry_after:g}s" if attempt.retry_after is not None else "")
