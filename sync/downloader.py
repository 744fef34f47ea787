"""Resumable downloads of signed files, checked while they stream.

A file accumulates in ``staging/<sha256>.part``; after a cut connection or a
restart the bytes already there are hashed again and the download continues
with ``Range: bytes=<have>-``. A 206 is accepted only when its Content-Range
starts exactly there and names the signed total; a 200 means the server sent
the whole file, so we start over; anything past the signed length is refused at
once (endless data) and the partial file deleted, as is a file whose sha256 is
not the signed one. Slow servers are cut by a read timeout and resumed. The
finished file is fsynced; the store renames it into place.

The HTTP side is aiohttp's client; retries back off exponentially. Nothing here
decides whether a file is wanted: callers pass the signed length and hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from security.errors import TargetMismatch, TargetTooLong, WrongLength

from .errors import DownloadFailed, HubUnreachable

log = logging.getLogger(__name__)

CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Fetch:
    url: str
    length: int
    sha256: str
    dest: Path


@dataclass
class DownloadStats:
    """What crossed the wire: tests check a resumed download fetched nothing twice."""

    bytes_received: int = 0
    requests: int = 0
    resumed_from: int = 0
    restarts: int = 0


class Downloader:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        retries: int = 5,
        backoff_s: float = 0.5,
        read_timeout_s: float = 30.0,
        chunk_bytes: int = 1 << 20,
    ) -> None:
        self.session = session
        self.retries = retries
        self.backoff_s = backoff_s
        self.read_timeout_s = read_timeout_s
        self.chunk_bytes = chunk_bytes

    async def fetch(self, item: Fetch, progress: Progress | None = None, stats: DownloadStats | None = None) -> Path:
        """Bring `item.dest` to the signed bytes (resuming what is there); returns it, fsynced."""
        stats = stats or DownloadStats()
        item.dest.parent.mkdir(parents=True, exist_ok=True)
        digest, have = await asyncio.to_thread(_hash_prefix, item.dest, item.length)
        stats.resumed_from = have
        if progress and have:
            progress(have)
        attempt = 0
        while True:
            if have == item.length:
                return await self._finish(item, digest)
            before = have
            try:
                have, digest = await self._attempt(item, have, digest, progress, stats)
                if have > before:
                    attempt = 0  # progress renews the patience
                    continue
                if have == item.length:
                    continue
                raise aiohttp.ClientPayloadError("the response ended without a byte")
            except (TargetMismatch, DownloadFailed):
                item.dest.unlink(missing_ok=True)
                raise
            except (aiohttp.ClientError, TimeoutError, HubUnreachable) as exc:
                # what reached the disk is what counts: hash it again rather than trust the attempt's state
                digest, have = await asyncio.to_thread(_hash_prefix, item.dest, item.length)
                attempt += 1
                if attempt > self.retries:
                    raise HubUnreachable(f"{item.url}: gave up after {self.retries} retries: {exc}") from None
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.info(
                    "download of %s interrupted at %d/%d bytes (%s); resuming in %.1fs",
                    item.url,
                    have,
                    item.length,
                    exc or type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _attempt(
        self, item: Fetch, have: int, digest: hashlib._Hash, progress: Progress | None, stats: DownloadStats
    ) -> tuple[int, hashlib._Hash]:
        headers = {"Range": f"bytes={have}-"} if have else {}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.read_timeout_s, sock_read=self.read_timeout_s)
        stats.requests += 1
        async with self.session.get(item.url, headers=headers, timeout=timeout) as resp:
            if resp.status == 206 and have:
                total = _content_range_total(resp.headers.get("Content-Range"))
                if total is not None and total != item.length:
                    raise WrongLength(
                        f"{item.url}: the server's file is {total} bytes; the signed length is {item.length}"
                    )
                if not _range_matches(resp.headers.get("Content-Range"), have, item.length):
                    log.warning(
                        "%s: 206 with Content-Range %r, not bytes %d-/%d: starting over",
                        item.url,
                        resp.headers.get("Content-Range"),
                        have,
                        item.length,
                    )
                    stats.restarts += 1
                    _truncate(item.dest)
                    return 0, hashlib.sha256()
            elif resp.status == 200:
                if resp.content_length is not None and resp.content_length != item.length:
                    raise WrongLength(
                        f"{item.url}: the server's file is {resp.content_length} bytes; the "
                        f"signed length is {item.length}"
                    )
                if have:
                    log.info("%s: the server ignored Range; starting over", item.url)
                    stats.restarts += 1
                have, digest = 0, hashlib.sha256()
                _truncate(item.dest)
            elif resp.status == 416 and have:
                total = _content_range_total(resp.headers.get("Content-Range"))
                if total is not None and total != item.length:
                    raise WrongLength(
                        f"{item.url}: the server's file is {total} bytes; the signed length is {item.length}"
                    )
                stats.restarts += 1  # what we hold is not a prefix of the file
                _truncate(item.dest)
                return 0, hashlib.sha256()
            elif resp.status >= 500 or resp.status == 429:
                raise HubUnreachable(f"{item.url}: HTTP {resp.status}")
            else:
                raise DownloadFailed(f"{item.url}: HTTP {resp.status}")
            with open(item.dest, "ab") as out:
                async for chunk in resp.content.iter_chunked(self.chunk_bytes):
                    if have + len(chunk) > item.length:
                        raise TargetTooLong(f"{item.url}: the server sent more than the signed {item.length} bytes")
                    out.write(chunk)
                    digest.update(chunk)
                    have += len(chunk)
                    stats.bytes_received += len(chunk)
                    if progress:
                        progress(len(chunk))
        return have, digest

    async def _finish(self, item: Fetch, digest: hashlib._Hash) -> Path:
        if item.sha256 and digest.hexdigest() != item.sha256:  # "": unverified (`models pull --unsigned`)
            item.dest.unlink(missing_ok=True)
            raise TargetMismatch(f"{item.url}: sha256 {digest.hexdigest()} is not the signed {item.sha256}")
        await asyncio.to_thread(_fsync, item.dest)
        return item.dest


def _hash_prefix(path: Path, length: int) -> tuple[hashlib._Hash, int]:
    """Hash what a previous attempt left (dropping it if it is longer than the file can be)."""
    digest = hashlib.sha256()
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return digest, 0
    if size > length:
        path.unlink()
        return digest, 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest, size


def _range_matches(header: str | None, start: int, length: int) -> bool:
    match = CONTENT_RANGE_RE.match(header or "")
    if not match:
        return False
    first, last, total = match.groups()
    return int(first) == start and start <= int(last) < length and total in (str(length), "*")


def _content_range_total(header: str | None) -> int | None:
    total = (header or "").rpartition("/")[2]
    return int(total) if total.isdigit() else None


def _truncate(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.truncate(path, 0)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
