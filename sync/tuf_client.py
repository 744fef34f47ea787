"""What the hub signed, as this device sees it: python-tuf's ngclient, run off the event loop.

`HubClient.refresh()` is one pass of TUF's client workflow (ngclient's
`Updater`): root rotations, timestamp, snapshot, targets, each checked for
signatures by a threshold of trusted keys, version rollback, expiry and
consistency, and persisted under ``<state_dir>/tuf`` only once verified. It then
reads this device's desired states (small targets, downloaded and verified by
ngclient itself, whose fetcher stops at the signed length) and looks up the
signed length and hashes of every file they name. The large model files are
fetched afterwards by our resumable downloader and checked against that info.

ngclient is synchronous (urllib3). Each refresh has one overall deadline
(`refresh_timeout_s`), kept by our fetcher (`DeadlineFetcher`): every request gets
at most what is left of it, and a body that keeps arriving a byte at a time is cut
when it runs out (urllib3's read timeout alone bounds only the gap between bytes).
`refresh_async` runs a refresh in a daemon thread and stops waiting for it at the
deadline: shutdown never waits on the network, and an abandoned thread ends at its
own deadline. Every python-tuf and transport error comes out as a security/ verdict
or `HubUnreachable` naming its cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib3
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient import Updater, UpdaterConfig, Urllib3Fetcher

from security.desired import DesiredModel, DesiredState, desired_path, effective_models, parse_desired
from security.errors import MetadataRefused, RefusedError, TrustRootError
from security.trust import parse_trust_root
from security.verdicts import verdict

from .errors import HubUnreachable

log = logging.getLogger(__name__)

#: How long `refresh_async` waits past the deadline for the thread to say why it stopped.
_GRACE_S = 1.0
#: What can go wrong between us and the hub, below python-tuf (urllib3, http.client, sockets).
TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError, TimeoutError)


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


class DeadlineFetcher(Urllib3Fetcher):
    """ngclient's urllib3 fetcher with one deadline for every request it makes.

    Each request gets a connect and read timeout of at most what is left before
    `deadline` (time.monotonic()), and the body is read one socket read at a time
    (`read1`), so a server that trickles bytes is cut when the deadline passes,
    not when it finishes. Every failure, mid-body included (a connection cut
    after some bytes: urllib3's ProtocolError), becomes a python-tuf
    `DownloadError` whose cause is the transport's error."""

    def __init__(self, deadline: float, socket_timeout: float, app_user_agent: str | None = None) -> None:
        super().__init__(app_user_agent=app_user_agent)
        self.socket_timeout = socket_timeout  # type: ignore[assignment]  # urllib3 takes a float
        self.deadline = deadline
        self.chunk_size = 64 * 1024

    def _left(self, url: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise tuf_errors.SlowRetrievalError(f"{url}: not received before the refresh deadline")
        return left

    def _fetch(self, url: str) -> Iterator[bytes]:
        timeout = min(float(self.socket_timeout), self._left(url))
        try:
            response = self._proxy_env.request(
                "GET", url, preload_content=False, timeout=urllib3.Timeout(connect=timeout, read=timeout)
            )
        except TRANSPORT_ERRORS as exc:  # MaxRetryError included: _describe says what is under it
            raise tuf_errors.DownloadError(f"{url}: {_describe(exc)}") from exc
        if response.status >= 400:
            response.close()
            raise tuf_errors.DownloadHTTPError(f"{url}: HTTP {response.status}", response.status)
        return self._body(url, response)

    def _body(self, url: str, response: urllib3.response.BaseHTTPResponse) -> Iterator[bytes]:
        try:
            while data := response.read1(self.chunk_size):
                self._left(url)
                yield data
        except tuf_errors.DownloadError:
            raise
        except TRANSPORT_ERRORS as exc:
            raise tuf_errors.DownloadError(f"{url}: {_describe(exc)}") from exc
        finally:
            response.release_conn()


class HubClient:
    """A TUF client for one hub URL, trusting one root (plus the rotations it signed)."""

    def __init__(
        self,
        metadata_dir: Path,
        hub_url: str,
        trust_root: bytes,
        group: str,
        device_id: str,
        timeout_s: float = 30.0,
        refresh_timeout_s: float = 120.0,
    ) -> None:
        parse_trust_root(trust_root)  # refuse a broken trust root before any network traffic
        self.metadata_dir = Path(metadata_dir)
        self.hub_url = hub_url.rstrip("/")
        self.trust_root = trust_root
        self.group = group
        self.device_id = device_id
        #: the longest wait for a connection or between two reads
        self.timeout_s = timeout_s
        #: the longest a whole refresh may take, every request included
        self.refresh_timeout_s = refresh_timeout_s
        self._busy = threading.Lock()  # one refresh at a time writes metadata_dir

    def _updater(self, download_dir: str, deadline: float) -> Updater:
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        return Updater(
            metadata_dir=str(self.metadata_dir),
            metadata_base_url=f"{self.hub_url}/metadata/",
            target_dir=download_dir,
            target_base_url=f"{self.hub_url}/targets/",
            fetcher=DeadlineFetcher(deadline, self.timeout_s, app_user_agent="edgefleet"),
            config=UpdaterConfig(app_user_agent="edgefleet"),
            bootstrap=self.trust_root,
        )

    async def refresh_async(self) -> HubView:
        """`refresh` in a daemon thread, waited for until its deadline (and a short grace).

        Past it, or when the caller is cancelled (shutdown), the thread is left to end at
        its own deadline: nothing, process exit included, waits for it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[HubView] = loop.create_future()

        def run() -> None:
            settle: Callable[[Any], None]
            try:
                outcome: Any = self.refresh()
                settle = future.set_result
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task as it is
                outcome, settle = exc, future.set_exception
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_settle, future, settle, outcome)

        thread = threading.Thread(target=run, name="edgefleet-hub-refresh", daemon=True)
        thread.start()
        try:
            return await asyncio.wait_for(future, self.refresh_timeout_s + _GRACE_S)
        except TimeoutError:
            log.warning("a look at the hub %s still runs past its %gs deadline; abandoned (its thread ends "
                        "on its own)", self.hub_url, self.refresh_timeout_s)
            raise HubUnreachable(
                f"hub {self.hub_url}: no complete answer within updates.refresh_timeout_s ({self.refresh_timeout_s:g}s)"
            ) from None
        except asyncio.CancelledError:
            if thread.is_alive():
                log.info("a look at the hub %s was cancelled; its thread is left to end at its deadline",
                         self.hub_url)
            raise

    def refresh(self) -> HubView:
        """One verified look at the hub (blocking: run it in a thread, or use `refresh_async`),
        given up as `HubUnreachable` after `refresh_timeout_s`."""
        deadline = time.monotonic() + self.refresh_timeout_s
        if not self._busy.acquire(timeout=self.refresh_timeout_s):
            raise HubUnreachable(
                f"hub {self.hub_url}: an earlier look at the hub is still running "
                f"(updates.refresh_timeout_s is {self.refresh_timeout_s:g}s)"
            )
        try:
            return self._refresh(deadline)
        finally:
            self._busy.release()

    def _refresh(self, deadline: float) -> HubView:
        try:
            with tempfile.TemporaryDirectory(prefix="edgefleet-tuf-") as download_dir:
                updater = self._updater(download_dir, deadline)
                updater.refresh()
                targets_version = self._trusted_targets_version()
                group = self._desired(updater, "group", self.group)
                device = self._desired(updater, "device", self.device_id)
                models = effective_models(group, device, self.device_id)
                files = {}
                for model in models.values():
                    for target_path in model.files.values():
                        files[target_path] = self._signed_file(updater, target_path)
                return HubView(targets_version, group, device, models, files)
        except RefusedError:
            raise
        except tuf_errors.DownloadLengthMismatchError as exc:
            raise _verdict(exc) from None
        except tuf_errors.SlowRetrievalError as exc:
            raise HubUnreachable(
                f"{_describe(exc)} (updates.refresh_timeout_s is {self.refresh_timeout_s:g}s, "
                f"read_timeout_s {self.timeout_s:g}s)"
            ) from None
        except tuf_errors.DownloadError as exc:  # the fetcher's messages name the URL
            raise HubUnreachable(_describe(exc)) from None
        except tuf_errors.RepositoryError as exc:
            raise _verdict(exc) from None
        except TrustRootError:
            raise
        except ValueError as exc:  # ngclient's "invalid argument" cases: malformed metadata
            raise MetadataRefused(f"metadata refused: {exc}") from None
        except TRANSPORT_ERRORS as exc:  # anything the fetcher did not see (it maps what it does)
            raise HubUnreachable(f"hub {self.hub_url}: {_describe(exc)}") from None

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


def _settle(future: asyncio.Future[HubView], settle: Callable[[Any], None], outcome: Any) -> None:
    if not future.done():  # not given up on
        settle(outcome)


def _describe(exc: BaseException) -> str:
    """A transport failure in one line: "cannot connect (Connection refused)", "Connection
    broken: IncompleteRead(100 bytes read, 334 more expected)"."""
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    if isinstance(exc, urllib3.exceptions.NewConnectionError) and isinstance(exc.__cause__, OSError):
        return f"cannot connect ({exc.__cause__.strerror or exc.__cause__})"
    if isinstance(exc, urllib3.exceptions.ProtocolError) and exc.args and isinstance(exc.args[0], str):
        return exc.args[0]
    if isinstance(exc, tuf_errors.DownloadError) and exc.__cause__ is not None and str(exc).startswith("Failed"):
        return f"{exc}: {_describe(exc.__cause__)}"  # python-tuf's own wrapper: say what is under it
    return str(exc) or type(exc).__name__


def _verdict(exc: BaseException) -> RefusedError:
    return verdict(exc) or MetadataRefused(str(exc))
