"""`edgefleet models pull URL --sha256 H`: download a model file, verified, then import it.

The download goes through the downloader signed updates use (sync/downloader.py):
resumable (``Range``, also across runs: the partial file waits in the user's cache,
``$XDG_CACHE_HOME/edgefleet/pulls``), its length fixed before the first byte and its
sha256 checked before anything is stored; a tqdm progress bar shows it, as for
`models fetch`. The URL is resolved first, following at most `MAX_REDIRECTS`
redirects and refusing one from https to http. Nothing reaches the store unless the
bytes are the ones named; then it is `models import` (agent/cli/models_local.py).

Without ``--sha256`` the pull is refused unless ``--unsigned`` says so, and an unsigned
pull is recorded in the device's audit log (security/audit.py `append_offline`) when
the log exists and this user may write it; otherwise a warning says it was not.
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import aiohttp
from tqdm import tqdm

from agent.cli.hub import HubCliError
from agent.cli.models_local import BAD_INPUT, import_plan
from agent.config import AgentConfig
from runtime.errors import BundleError, StoreError
from runtime.files import sha256_file
from runtime.importer import inspect_model
from security.errors import SecurityError
from sync.downloader import Downloader, Fetch
from sync.errors import SyncError

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class PullRefused(HubCliError):
    """The URL or its answer is refused: a bad redirect, a wrong length or other bytes."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgefleet" / "pulls"


async def resolve(session: aiohttp.ClientSession, url: str) -> tuple[str, int]:
    """The URL that answers 200 after at most MAX_REDIRECTS redirects, and its length."""
    seen = 0
    while True:
        scheme = urlsplit(url).scheme
        if scheme not in ("http", "https"):
            raise PullRefused(f"{url}: only http:// and https:// URLs can be pulled", code=BAD_INPUT)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=30)
        try:  # HEAD: no body is sent for nothing; a server that will not answer it gets a GET
            async with session.head(url, allow_redirects=False, timeout=timeout) as resp:
                status, location, length = resp.status, resp.headers.get("Location"), resp.content_length
            if status in (405, 501):
                async with session.get(url, allow_redirects=False, timeout=timeout) as resp:
                    status, location, length = resp.status, resp.headers.get("Location"), resp.content_length
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PullRefused(f"{url}: cannot connect ({exc.__class__.__name__}: {exc})") from None
        if status in (301, 302, 303, 307, 308) and location:
            target = urljoin(url, location)
            if scheme == "https" and urlsplit(target).scheme != "https":
                raise PullRefused(f"{url} redirects to {target}: a redirect from https to http is refused",
                                  code=BAD_INPUT)
            seen += 1
            if seen > MAX_REDIRECTS:
                raise PullRefused(f"{url}: more than {MAX_REDIRECTS} redirects", code=BAD_INPUT)
            url = target
            continue
        if status != 200:
            raise PullRefused(f"{url}: HTTP {status}")
        if length is None:
            raise PullRefused(f"{url}: the server does not say the file's length (no Content-Length)")
        return url, length


def pull_command(config: AgentConfig, url: str, sha256: str | None, unsigned: bool, name: str | None,
                 version: str | None) -> int:
    if sha256 is None and not unsigned:
        raise HubCliError("refusing an unverified download: give the file's --sha256 (or --unsigned to trust "
                          "the server, which is recorded in the audit log)", code=BAD_INPUT)
    if sha256 is not None:
        sha256 = sha256.lower().removeprefix("sha256:")
        if not SHA256_RE.match(sha256):
            raise HubCliError(f"--sha256 {sha256!r} is not a sha256 (64 hex digits)", code=BAD_INPUT)
    file_name = Path(unquote(urlsplit(url).path)).name or "model"
    key = sha256 or "unsigned-" + hashlib.sha256(url.encode()).hexdigest()[:16]
    partial = cache_dir() / f"{key}.part"
    try:
        path = asyncio.run(_download(url, sha256, partial))
    except (SecurityError, SyncError) as exc:
        raise PullRefused(f"download refused, nothing stored: {exc}", code=BAD_INPUT) from None
    try:
        with tempfile.TemporaryDirectory(prefix="edgefleet-pull-") as workdir:
            named = Path(workdir) / file_name  # its name tells .onnx from .gguf; a link, not a copy
            try:
                os.link(path, named)
            except OSError:
                named.symlink_to(path)
            try:
                plan = inspect_model(named, name, version, Path(workdir))
            except (BundleError, StoreError) as exc:
                raise HubCliError(f"cannot import {url}: {' '.join(str(exc).split())}", code=BAD_INPUT) from None
            if unsigned:
                _audit_unsigned(config, url, plan.name, sha256_file(path))
            code = import_plan(config, plan)
    finally:
        path.unlink(missing_ok=True)
    return code


async def _download(url: str, sha256: str | None, partial: Path) -> Path:
    async with aiohttp.ClientSession() as session:
        final, length = await resolve(session, url)
        downloader = Downloader(session, retries=5, backoff_s=0.2)
        with tqdm(total=length, unit="B", unit_scale=True, desc=Path(urlsplit(final).path).name or final,
                  disable=None) as bar:
            return await downloader.fetch(Fetch(final, length, sha256 or "", partial), bar.update)


def _audit_unsigned(config: AgentConfig, url: str, name: str, digest: str) -> None:
    """Record an unsigned pull in the audit log where it exists (else say it was not)."""
    from security.audit import append_offline

    directory = config.audit.directory(config.state_dir)
    if not config.audit.enabled or not directory.is_dir():
        log.warning("unsigned pull of %s (sha256 %s): no audit log at %s to record it in", url, digest, directory)
        return
    try:
        append_offline(Path(config.state_dir), getpass.getuser(), "model.pull.unsigned", name, "ok",
                       directory=directory, url=url, sha256=digest)
    except OSError as exc:
        log.warning("unsigned pull of %s not recorded in the audit log %s: %s", url, directory,
                    exc.strerror or exc)
