"""`edgefleet hub serve`: the repository directory over plain HTTP, with Range requests.

The hub is static signed files, so this is aiohttp's static file handler and
nothing else: it answers Range requests with 206 and a Content-Range (what the
agents' resumable downloader needs), never lists directories and never follows
symlinks out of the repository. At scale any HTTP server, CDN or S3-style
bucket serving the same directory does the same job.
"""

from __future__ import annotations

import os
from pathlib import Path

from aiohttp import web

from sync.errors import HubError


def hub_app(repository_dir: Path) -> web.Application:
    app = web.Application()
    app.router.add_static("/", Path(repository_dir), show_index=False, follow_symlinks=False)
    return app


def serve_hub(repository_dir: Path, host: str, port: int, announce: str | None = None) -> None:
    """Serve until interrupted (blocking), printing `announce` once the port listens. A port that
    cannot be bound is a HubError naming it."""

    def listening(_: str) -> None:  # aiohttp's own banner is replaced by ours
        if announce:
            print(announce, flush=True)

    try:
        web.run_app(hub_app(repository_dir), host=host, port=port, print=listening)
    except OSError as exc:  # raised by the bind, before anything is served
        # asyncio's bind error wraps the reason in its own sentence; say it plainly
        reason = os.strerror(exc.errno).lower() if exc.errno and exc.errno > 0 else (exc.strerror or str(exc))
        raise HubError(f"cannot listen on {host}:{port}: {reason} (stop what uses it, or choose another "
                       f"--port / --host)") from None
