"""The hub's long-running commands (`hub control`, `hub webhooks`) run the same way: one
asyncio loop until SIGTERM (systemd's stop) or SIGINT (Ctrl-C), then a clean exit."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `main(stop)` in a new loop; SIGTERM and SIGINT set `stop`, and `main` returns."""

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(run())
