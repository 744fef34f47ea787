"""`edgefleet models rollback NAME` and `edgefleet models fetch`: signed updates from the CLI.

`rollback` asks the running agent (its local HTTP endpoint) to serve again the last
version that served well before the current one, which switches at once when that
version is still loaded; with no agent running it switches `current` on disk, so
the next start serves it. Either way the version rolled back from is not installed
again until the hub publishes a newer desired state, and a second rollback goes
further back rather than to it. Errors are one line.

`fetch` does the download half of an update in the foreground, with a progress
bar (tqdm): refresh the hub's metadata through TUF, then fetch and verify every
file the desired state names into the store. Nothing is activated; the agent
finds the files there and skips their download.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

import aiohttp
from tqdm import tqdm

from agent.cli.hub import HubCliError
from agent.config import AgentConfig, ServerConfig
from agent.fleet.updates import offline_rollback
from runtime.errors import RuntimeLayerError
from runtime.state_lock import StateDirLock
from runtime.store import ModelStore
from security.errors import SecurityError
from security.tls_server import local_client_context
from sync.downloader import Downloader, Fetch
from sync.errors import SyncError
from sync.tuf_client import HubClient


def rollback_command(config: AgentConfig, name: str) -> int:
    server = config.server
    host = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else server.host
    url = f"{server.scheme}://{host}:{server.port}/v2/repository/models/{name}/rollback"
    headers = local_auth_headers(server)
    tls = local_tls(server)

    async def ask_agent() -> tuple[int, dict[str, object]] | None:
        try:
            async with aiohttp.ClientSession() as session, session.post(url, headers=headers, ssl=tls) as resp:
                return resp.status, await resp.json(content_type=None)
        except aiohttp.ClientSSLError as exc:  # an agent answers, but not as configured: say so, never go offline
            raise HubCliError(f"cannot roll {name} back: the agent at {url} refused TLS or presented another "
                              f"certificate than server.tls_cert_file ({exc.__class__.__name__}: "
                              f"{getattr(exc, 'reason', None) or exc})") from None
        except aiohttp.ClientConnectionError:
            return None

    answer = asyncio.run(ask_agent())
    if answer is None:
        try:
            with StateDirLock(config.state_dir, f"models rollback {name}"):  # refused while an agent holds it
                version = offline_rollback(config, name)
        except RuntimeLayerError as exc:
            raise HubCliError(f"cannot roll {name} back: {_clause(str(exc))}") from None
        print(f"{name}: current is now {version} (no agent was running; it serves {version} when it starts)")
        return 0
    status, body = answer
    if status != 200:
        raise HubCliError(f"cannot roll {name} back: {_error_message(status, body)}")
    print(f"{name}: rolled back, serving {body.get('version')}")
    return 0


#: a key for the CLI's calls to the local agent (`edgefleet keys add cli --scope admin`), where the
#: keys file holds named keys and server.api_key is unset
API_KEY_ENV = "EDGEFLEET_API_KEY"


def local_auth_headers(server: ServerConfig) -> dict[str, str]:
    """The bearer key the CLI sends to the local agent: $EDGEFLEET_API_KEY, else server.api_key."""
    key = os.environ.get(API_KEY_ENV) or server.api_key
    return {"Authorization": f"Bearer {key}"} if key else {}


def local_tls(server: ServerConfig) -> ssl.SSLContext | bool:
    """The TLS context commands use to reach the local agent (True: plain HTTP, aiohttp's default)."""
    if server.tls_cert_file is None:
        return True
    try:
        return local_client_context(server.tls_cert_file, server.tls_cli_cert_file, server.tls_cli_key_file)
    except ValueError as exc:
        raise HubCliError(str(exc)) from None


def _error_message(status: int, body: object) -> str:
    """The sentence in an error answer, KServe v2 (``{"error": "..."}``) or OpenAI style
    (``{"error": {"message": "..."}}``); never the raw body."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    if not isinstance(error, str) or not error.strip():
        return f"the agent answered HTTP {status} without an error message."
    return _clause(error)


def _clause(text: str) -> str:
    """A sentence as the rest of a CLI line: one line, lower-case first word (not "HTTP")."""
    text = " ".join(text.split())
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


def fetch_command(config: AgentConfig) -> int:
    settings = config.updates
    if not settings.enabled or settings.hub_url is None:
        raise HubCliError("[updates] hub_url is not set in the config: there is no hub to fetch from", code=2)
    try:
        trust_root = Path(settings.trust_root).read_bytes()
        hub = HubClient(Path(config.state_dir) / "tuf", settings.hub_url, trust_root, config.mqtt.group,
                        config.mqtt.device_id, timeout_s=settings.read_timeout_s,
                        refresh_timeout_s=settings.refresh_timeout_s)
        view = hub.refresh()
    except OSError as exc:
        raise HubCliError(f"updates.trust_root {settings.trust_root}: {exc.strerror}") from None
    except (SecurityError, SyncError) as exc:
        raise HubCliError(f"refused: {exc}") from None
    store = ModelStore(config.state_dir)
    store.ensure_layout()
    wanted = {s.sha256: s for s in view.files.values() if not store.has_blob(s.sha256)}
    models = ", ".join(f"{m.name}={m.version}" for m in view.models.values()) or "nothing"
    print(f"hub (targets v{view.targets_version}) says this device runs: {models}")
    if not wanted:
        print("every file is already in the store")
        return 0

    async def download() -> None:
        async with aiohttp.ClientSession() as session:
            downloader = Downloader(session, retries=settings.download_retries, read_timeout_s=settings.read_timeout_s)
            for signed in wanted.values():
                with tqdm(total=signed.length, unit="B", unit_scale=True, desc=signed.target_path) as bar:
                    path = await downloader.fetch(Fetch(signed.url, signed.length, signed.sha256,
                                                        store.staging_path(signed.sha256)), bar.update)
                store.add_blob(path, signed.sha256)

    try:
        asyncio.run(download())
    except (SecurityError, SyncError) as exc:
        raise HubCliError(f"download failed: {exc}") from None
    print(f"{len(wanted)} file(s) verified into {store.blobs}")
    return 0
