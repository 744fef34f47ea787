"""Models without a hub, through the running agent: upload, import, remove, list what runs.

Beside the KServe v2 model-repository extension (agent/http/ops_api.py), and with its
``admin`` scope. The CLI (agent/cli/models_local.py) uses these while an agent runs,
since the agent holds the state dir's lock and owns its files (it runs as its own
user under systemd); with no agent running the CLI does the same on disk itself.

- ``HEAD /v2/repository/blobs/{sha256}``: 200 when the store has the blob, else 404.
- ``PUT /v2/repository/blobs/{sha256}``: the body is the file; it is hashed as it
  streams into ``staging/`` and enters the store only when its sha256 is the one named
  (Ollama's ``POST /api/blobs/sha256:…`` does the same for ``ollama create``).
- ``POST /v2/repository/models/{name}/import`` ``{"version", "files": {file: sha256}}``:
  lay the version out from blobs, make it current, mark the name imported and load it
  (hot swap when the name serves). 409 when the version exists with other bytes.
- ``DELETE /v2/repository/models/{name}[?version=V][&force=true]``: 409 when it serves,
  unless ``force``, which unloads it first.
- ``GET /v2/repository/ps``: what is loaded, its size, when it was last used and how
  long its keep-alive has left (``ollama ps``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from typing import Any

from aiohttp import web

from agent.context import LIVE, MODELS
from agent.http.bodies import read_json
from agent.http.errors import ApiError
from agent.http.jsonio import json_response
from runtime.bundle import read_bundle
from runtime.errors import BundleError, ModelNotFoundError, RuntimeLayerError, StoreError
from runtime.importer import ImportConflict, commit_import, imported_names, remove_model
from runtime.registry import ModelState
from runtime.store import SHA256_RE, ModelStore, check_file_name

CHUNK = 1 << 20


def setup(app: web.Application) -> None:
    app.router.add_route("HEAD", "/v2/repository/blobs/{sha256}", blob_exists)
    app.router.add_put("/v2/repository/blobs/{sha256}", upload_blob)
    app.router.add_post("/v2/repository/models/{name}/import", import_model)
    app.router.add_delete("/v2/repository/models/{name}", remove)
    app.router.add_get("/v2/repository/ps", running)


def _store(request: web.Request) -> ModelStore:
    return ModelStore(request.app[LIVE].config.state_dir)


def _sha(request: web.Request) -> str:
    sha = request.match_info["sha256"].removeprefix("sha256:")
    if not SHA256_RE.match(sha):
        raise ApiError(400, f"{sha!r} is not a sha256 (64 lower-case hex digits)")
    return sha


async def blob_exists(request: web.Request) -> web.Response:
    return web.Response(status=200 if _store(request).has_blob(_sha(request)) else 404)


async def upload_blob(request: web.Request) -> web.Response:
    """Stream the body into staging, hashing it; into the store only when it hashes to the name."""
    sha, store = _sha(request), _store(request)
    if store.has_blob(sha):
        return json_response({"sha256": sha, "stored": False})
    store.ensure_layout()
    temp = store.staging / f"{sha}.upload-{os.getpid()}-{id(request)}"
    digest = hashlib.sha256()
    try:
        with open(temp, "wb") as out:
            async for chunk in request.content.iter_chunked(CHUNK):
                digest.update(chunk)
                await asyncio.to_thread(out.write, chunk)
        if digest.hexdigest() != sha:
            raise ApiError(400, f"the uploaded bytes hash to {digest.hexdigest()}, not {sha}: nothing stored")
        await asyncio.to_thread(store.add_blob, temp, sha)
    except OSError as exc:
        raise ApiError(507, f"cannot store the upload in {store.staging}: {exc.strerror or exc}") from None
    finally:
        temp.unlink(missing_ok=True)
    return json_response({"sha256": sha, "stored": True}, status=201)


async def import_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    body = await read_json(request)
    version = body.get("version") if isinstance(body, dict) else None
    files = body.get("files") if isinstance(body, dict) else None
    if not isinstance(version, str) or not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ApiError(400, 'the body must be {"version": "...", "files": {"file name": "sha256", ...}}')
    store = _store(request)
    try:
        for file_name, sha in files.items():
            check_file_name(file_name)
            if not SHA256_RE.match(sha) or not store.has_blob(sha):
                raise ApiError(400, f"{file_name}: blob {sha} is not in the store; upload it first")
        before = store.current(name)
        changed = await asyncio.to_thread(commit_import, store, name, version, files)
        bundle = await asyncio.to_thread(read_bundle, store.models / name / "current", name)
    except ImportConflict as exc:
        raise ApiError(409, str(exc), code="version_exists") from None
    except (StoreError, BundleError) as exc:
        raise ApiError(400, str(exc)) from None
    models = request.app[MODELS]
    serving = next((s for s in models.serving() if s.name == name), None)
    if serving is None or serving.version != bundle.version or changed:
        try:
            await models.load(bundle)  # a failure is a 400 naming why
        except RuntimeLayerError:
            if before is not None and before != version:  # the version that served stays current
                await asyncio.to_thread(store.activate, name, before, f"{version} did not load")
            raise
    return json_response({"name": name, "version": version, "changed": changed, "state": "ready"})


async def remove(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    version = request.query.get("version") or None
    force = request.query.get("force", "").lower() in ("1", "true", "yes")
    store, models = _store(request), request.app[MODELS]
    status = next((s for s in models.statuses() if s.name == name), None)
    serves = status is not None and status.state is not ModelState.FAILED and (
        version is None or status.version == version)
    try:
        known = bool(store.versions(name))
    except StoreError:  # not even a valid name
        known = False
    if not known:
        raise ModelNotFoundError(name)
    if serves:
        if not force:
            raise ApiError(409, f"{name} {status.version if status else ''} is serving; stop it first or use "
                           "--force (which unloads it)", code="model_serving")
        await models.unload(name)
    try:
        removed = await asyncio.to_thread(remove_model, store, name, version)
    except StoreError as exc:
        raise ApiError(404 if "has no version" in str(exc) else 400, str(exc)) from None
    if version is None and status is not None and not serves:  # a failed one: off the listings too
        with contextlib.suppress(ModelNotFoundError):
            await models.unload(name)
    return json_response({"name": name, "removed": removed, "unloaded": serves})


async def running(request: web.Request) -> web.Response:
    """Loaded models: name, version, size of its files, last use, keep-alive left."""
    models = request.app[MODELS]
    now, wall = time.monotonic(), time.time()
    out: list[dict[str, Any]] = []
    for served in models.serving():
        keep = models.keep_alive_for(served.name)
        idle = max(0.0, now - served.usage.last_active)
        out.append({
            "name": served.name,
            "version": served.version,
            "format": served.bundle.manifest.format,
            "size_bytes": await asyncio.to_thread(served.bundle.size_bytes),
            "loaded_at": served.loaded_at,
            "last_used_at": wall - idle,
            "in_flight": served.scheduler.depth,
            "keep_alive_s": keep if keep > 0 else None,
            "expires_in_s": max(0.0, keep - idle) if keep > 0 else None,
            "imported": served.name in imported_names(request.app[LIVE].config.state_dir),
        })
    return json_response({"models": out})

