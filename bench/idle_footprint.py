"""Resident memory and CPU of an idle agent with no models.

    .venv/bin/python bench/idle_footprint.py [--seconds 30]

Starts `edgefleet serve` with an empty state directory and no config, waits
until it answers /readyz, then samples its RSS and CPU time over a quiet
interval (no requests), and once more after one /metrics scrape.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = tempfile.mkdtemp(prefix="edgefleet-idle-")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "serve", "--state-dir", state, "--port", str(port)],
                            cwd=ROOT, env={**os.environ, "EDGEFLEET_CONFIG": ""},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/readyz", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        p = psutil.Process(proc.pid)
        time.sleep(2)
        cpu0, t0 = p.cpu_times(), time.monotonic()
        time.sleep(args.seconds)
        cpu1, t1 = p.cpu_times(), time.monotonic()
        used = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        mem = p.memory_full_info()
        print(f"idle agent, no models: RSS {mem.rss / 2**20:.1f} MiB (USS {mem.uss / 2**20:.1f} MiB), "
              f"threads {p.num_threads()}, CPU {100 * used / (t1 - t0):.3f}% of one core over {t1 - t0:.0f}s")
        urllib.request.urlopen(url + "/metrics", timeout=5).read()
        print(f"after one /metrics scrape: RSS {p.memory_info().rss / 2**20:.1f} MiB")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
