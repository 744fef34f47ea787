"""`edgefleet models import / list / ps / rm`: models without a hub, from the command line.

A running agent holds the state dir (its lock, and under systemd its files belong to
the `edgefleet` user), so while one answers on its local HTTP endpoint every change
goes through it (agent/http/models_api.py): `import` checks the file here, uploads
each file the store lacks (hashed again on the agent's side) and asks the agent to
lay the version out and load it, so it serves at once, without a restart and with
files owned by the agent's user. With no agent running the CLI writes the store
itself under the state-dir lock (runtime/importer.py); run as root on a state dir
that belongs to another user, it hands what it wrote to that user, so the service
can still manage it. Errors are one line; bad input (not a model, a version that
exists with other bytes) exits 2.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from agent.cli.hub import HubCliError
from agent.cli.models import _error_message, local_auth_headers, local_tls
from agent.config import AgentConfig
from runtime.bundle import read_bundle
from runtime.errors import BundleError, RuntimeLayerError, StoreError
from runtime.importer import (
    IMPORTED_FILE,
    ImportConflict,
    ImportPlan,
    file_digests,
    import_files,
    imported_names,
    inspect_model,
    remove_model,
)
from runtime.state_lock import StateDirLock
from runtime.store import ModelStore

#: exit status for bad input (not a model, an immutable version with other bytes)
BAD_INPUT = 2


@dataclass
class AgentAnswer:
    status: int
    body: Any


class LocalAgent:
    """The running agent's local HTTP endpoint, as `models rollback` reaches it."""

    def __init__(self, config: AgentConfig) -> None:
        server = config.server
        host = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else server.host
        self.url = f"{server.scheme}://{host}:{server.port}"
        self.headers = local_auth_headers(server)
        self.tls = local_tls(server)

    async def call(self, session: aiohttp.ClientSession, method: str, path: str,
                   **kwargs: Any) -> AgentAnswer | None:
        """The answer, or None when nothing listens (no agent running)."""
        try:
            async with session.request(method, self.url + path, headers=self.headers, ssl=self.tls,
                                       **kwargs) as resp:
                text = await resp.text()
                try:
                    body = json.loads(text) if text else None
                except ValueError:
                    body = {"error": text.strip()[:300]}
                return AgentAnswer(resp.status, body)
        except aiohttp.ClientSSLError as exc:
            raise HubCliError(f"the agent at {self.url} refused TLS or presented another certificate than "
                              f"server.tls_cert_file ({exc.__class__.__name__})") from None
        except aiohttp.ClientConnectionError:
            return None

    def ask(self, method: str, path: str, **kwargs: Any) -> AgentAnswer | None:
        async def once() -> AgentAnswer | None:
            async with aiohttp.ClientSession() as session:
                return await self.call(session, method, path, **kwargs)

        return asyncio.run(once())


# ---- import ------------------------------------------------------------------------------


def import_command(config: AgentConfig, path: Path, name: str | None, version: str | None) -> int:
    with tempfile.TemporaryDirectory(prefix="edgefleet-import-") as workdir:
        try:
            plan = inspect_model(path, name, version, Path(workdir))
        except (BundleError, StoreError) as exc:
            raise HubCliError(f"cannot import {path}: {_clause(str(exc), path)}", code=BAD_INPUT) from None
        return import_plan(config, plan)


def import_plan(config: AgentConfig, plan: ImportPlan) -> int:
    """Store and serve a checked plan: through the running agent, else on disk."""
    agent = LocalAgent(config)
    digests = file_digests(plan)
    answer = asyncio.run(_import_through_agent(agent, plan, digests))
    if answer is None:
        try:
            with StateDirLock(config.state_dir, f"models import {plan.name}"):
                store = ModelStore(config.state_dir)
                store.ensure_layout()
                changed = import_files(store, plan)
                hand_over(Path(config.state_dir), [store.models / plan.name, *(store.blob_path(s)
                                                    for s in digests.values())])
        except ImportConflict as exc:
            raise HubCliError(f"cannot import {plan.name}: {exc}", code=BAD_INPUT) from None
        what = "imported" if changed else "already imported (same bytes): nothing changed"
        print(f"{plan.name} {plan.version}: {what}; no agent is running: it serves {plan.version} when it starts")
        return 0
    if answer.status == 409:
        raise HubCliError(f"cannot import {plan.name}: {_error_message(answer.status, answer.body)}",
                          code=BAD_INPUT)
    if answer.status != 200:
        raise HubCliError(f"cannot import {plan.name}: {_error_message(answer.status, answer.body)}")
    what = "imported" if answer.body.get("changed") else "already imported (same bytes): nothing changed"
    print(f"{plan.name} {plan.version}: {what}; the running agent serves it")
    return 0


async def _import_through_agent(agent: LocalAgent, plan: ImportPlan,
                                digests: dict[str, str]) -> AgentAnswer | None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=600)) as session:
        for file_name, sha in digests.items():
            have = await agent.call(session, "HEAD", f"/v2/repository/blobs/{sha}")
            if have is None:
                return None
            if have.status == 200:
                continue
            if have.status != 404:
                raise HubCliError(f"cannot import {plan.name}: {_error_message(have.status, have.body)}")
            with open(plan.sources[file_name], "rb") as body:
                sent = await agent.call(session, "PUT", f"/v2/repository/blobs/{sha}", data=body)
            if sent is None:
                raise HubCliError(f"cannot import {plan.name}: the agent went away during the upload")
            if sent.status not in (200, 201):
                raise HubCliError(f"cannot import {plan.name}: uploading {file_name}: "
                                  f"{_error_message(sent.status, sent.body)}")
        return await agent.call(session, "POST", f"/v2/repository/models/{plan.name}/import",
                                json={"version": plan.version, "files": digests})


def hand_over(state_dir: Path, paths: Iterable[Path]) -> None:
    """Run as root on a state dir that belongs to another user (the service's): give what this
    command wrote to that user, so the agent can still manage it."""
    if os.geteuid() != 0:
        return
    owner = state_dir.stat()
    if owner.st_uid == 0:
        return
    extra = [state_dir / "state.json", state_dir / IMPORTED_FILE, state_dir / "models", state_dir / "store"]
    for path in [*paths, *extra]:
        if not path.exists():
            continue
        walk = [path] if not path.is_dir() else [path, *path.rglob("*")]
        for item in walk:
            os.chown(item, owner.st_uid, owner.st_gid, follow_symlinks=False)


# ---- list / ps / rm -----------------------------------------------------------------------


def list_command(config: AgentConfig, as_json: bool) -> int:
    """Every model the agent would serve or the store holds: versions, current, state, size."""
    store = ModelStore(config.state_dir)
    try:
        imported = set(imported_names(config.state_dir))
    except StoreError:
        imported = set()
    names = list(dict.fromkeys([*(m.name for m in config.models), *store.names(), *sorted(imported)]))
    answer = LocalAgent(config).ask("POST", "/v2/repository/index")
    states: dict[str, str] = {}
    if answer is not None and answer.status == 200 and isinstance(answer.body, list):
        states = {s["name"]: s["state"] + (f": {s['reason']}" if s.get("reason") else "") for s in answer.body}
    rows: list[dict[str, Any]] = []
    entries = {m.name: m for m in config.models}
    for name in names:
        entry = entries.get(name)
        path = config.bundle_path(entry) if entry else store.models / name / "current"
        row: dict[str, Any] = {"name": name, "versions": _versions(store, name), "current": _current(store, name),
                               "imported": name in imported, "configured": entry is not None, "path": str(path)}
        try:
            bundle = read_bundle(path, name=name)
            m = bundle.manifest
            row |= {"version": m.version, "format": m.format, "task": m.task, "size_bytes": bundle.size_bytes(),
                    "error": None}
        except (RuntimeLayerError, OSError) as exc:
            row |= {"version": None, "format": None, "task": None, "size_bytes": None, "error": str(exc)}
        row["state"] = "not running" if answer is None else states.get(name, "not served")
        rows.append(row)
    if as_json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no models configured (add [[models]] to the config, `edgefleet models import FILE`, or use --demo)")
    else:
        print(f"{'NAME':28} {'CURRENT':16} {'VERSIONS':>8} {'FORMAT':6} {'TASK':10} {'SIZE':>9}  STATE")
        for r in rows:
            size = f"{r['size_bytes'] / 1e6:.1f}MB" if r["size_bytes"] is not None else "-"
            print(f"{r['name']:28} {r['version'] or r['current'] or '-':16} {len(r['versions']):>8} "
                  f"{r['format'] or '-':6} {r['task'] or '-':10} {size:>9}  {r['state']}")
            if r["error"]:
                print(f"  error: {r['error']}")
    return 1 if any(r["error"] and r["configured"] for r in rows) else 0


def _versions(store: ModelStore, name: str) -> list[str]:
    try:
        return store.versions(name)
    except StoreError:
        return []


def _current(store: ModelStore, name: str) -> str | None:
    try:
        return store.current(name)
    except StoreError:
        return None


def ps_command(config: AgentConfig, as_json: bool) -> int:
    """What the running agent has loaded (`ollama ps`)."""
    answer = LocalAgent(config).ask("GET", "/v2/repository/ps")
    if answer is None:
        raise HubCliError("no agent is running (nothing answers on "
                          f"{LocalAgent(config).url}); `systemctl start edgefleet` or `edgefleet serve`")
    if answer.status != 200:
        raise HubCliError(f"cannot list loaded models: {_error_message(answer.status, answer.body)}")
    models = answer.body.get("models", [])
    if as_json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print("no model is loaded")
        return 0
    print(f"{'NAME':28} {'VERSION':16} {'SIZE':>9} {'LAST USED':>10}  UNTIL")
    for m in models:
        ago = f"{max(0, time.time() - m['last_used_at']):.0f}s ago"
        until = "forever" if m["expires_in_s"] is None else f"{m['expires_in_s']:.0f}s from now"
        print(f"{m['name']:28} {m['version']:16} {m['size_bytes'] / 1e6:8.1f}M {ago:>10}  {until}")
    return 0


def rm_command(config: AgentConfig, target: str, force: bool, as_json: bool) -> int:
    name, _, version = target.partition("@")
    query = {"force": "true" if force else "false"} | ({"version": version} if version else {})
    answer = LocalAgent(config).ask("DELETE", f"/v2/repository/models/{name}", params=query)
    if answer is None:
        try:
            with StateDirLock(config.state_dir, f"models rm {target}"):
                store = ModelStore(config.state_dir)
                if not _versions(store, name):
                    raise HubCliError(f"cannot remove {target}: there is no model {name} in the store")
                removed = remove_model(store, name, version or None)
        except StoreError as exc:
            raise HubCliError(f"cannot remove {target}: {_clause(str(exc), None)}") from None
        body: dict[str, Any] = {"name": name, "removed": removed, "unloaded": False}
    elif answer.status != 200:
        code = BAD_INPUT if answer.status == 409 else 1
        raise HubCliError(f"cannot remove {target}: {_error_message(answer.status, answer.body)}", code=code)
    else:
        body = answer.body
    if as_json:
        print(json.dumps(body, indent=2))
    else:
        unloaded = " (unloaded first)" if body.get("unloaded") else ""
        print(f"{name}: removed {', '.join(body['removed'])}{unloaded}")
    return 0


def _clause(text: str, path: Path | None) -> str:
    """One line; the path is said once already by the caller."""
    text = " ".join(text.split())
    if path is not None:
        text = text.removeprefix(f"{path}: ")
    return text

