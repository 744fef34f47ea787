"""`edgefleet hub serve`: the repository directory over plain HTTP, with Range requests.

The hub is static signed files, so this is aiohttp's static file handler and
nothing else: it answers Range requests with 206 and a Content-Range (what the
agents' resumable downloader needs), never lists directories and never follows
symlinks out of the repository. At scale any HTTP server, CDN or S3-style
bucket serving the same directory does the same job.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web


def hub_app(repository_dir: Path) -> web.Application:
    app = web.Application()
    app.router.add_static("/", Path(repository_dir), show_index=False, follow_symlinks=False)
    return app


def serve_hub(repository_dir: Path, host: str, port: int, announce: str | None = None) -> None:
    """Serve until interrupted (blocking), printing `announce` once the port listens. A port that
    cannot be bound raises the bind's OSError (the CLI says it in one line)."""

    def listening(_: str) -> None:  # aiohttp's own banner is replaced by ours
        if announce:
            print(announce, flush=True)

    web.run_app(hub_app(repository_dir), host=host, port=port, print=listening)
