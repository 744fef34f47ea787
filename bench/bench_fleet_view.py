"""The fleet view under load: N simulated devices publish telemetry every few seconds while a
real chromium shows the page; how long from a publish to the row showing it, and what the
hub's view process costs.

    .venv/bin/python bench/bench_fleet_view.py [--devices 300] [--interval 3] [--seconds 60]

A real mosquitto and `edgefleet hub view` (a subprocess, its CPU read with psutil); the
devices are tests/fleet_view_sim.py's messages of the real schemas from one publisher.
Every second a probe device publishes a telemetry record with a power figure never seen
before; the lag is the time until chromium's DOM shows that figure in its row (Playwright
waits on the DOM; its polling adds a few ms). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import psutil  # noqa: E402
from fleet_view_sim import Publisher, realistic_fleet, telemetry  # noqa: E402
from mqtt_broker import MosquittoBroker, free_port  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=300)
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between a device's records")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = MosquittoBroker(work)
        broker.start()
        port = free_port()
        view = subprocess.Popen([sys.executable, "-m", "agent", "hub", "view", "--mqtt", f"127.0.0.1:{broker.port}",
                                 "--port", str(port), "--history", str(work / "history.sqlite3")], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pub = Publisher("127.0.0.1", broker.port)
        ids = realistic_fleet(pub, args.devices)
        stop = threading.Event()
        sent = [0]

        def load() -> None:  # every device, once per interval, spread evenly
            seq = 3
            while not stop.is_set():
                start = time.monotonic()
                for i, device in enumerate(ids):
                    if stop.is_set():
                        return
                    group = ["shop-floor", "warehouse", "lab"][i % 3]
                    pub.send(device, "telemetry", telemetry(device, group, seq, time.time(), 500 * seq,
                                                            power_w=5 + (i % 7), temp_c=50 + (seq % 10)))
                    sent[0] += 1
                    time.sleep(max(0.0, start + args.interval * (i + 1) / len(ids) - time.monotonic()))
                seq += 1

        proc = psutil.Process(view.pid)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            deadline = time.monotonic() + 30
            while True:
                try:
                    page.goto(f"http://127.0.0.1:{port}/")
                    break
                except Exception:  # noqa: BLE001 - the server is still starting
                    assert time.monotonic() < deadline, "hub view did not start"
                    time.sleep(0.3)
            page.wait_for_selector(f'tr[data-device="{ids[-1]}"]', timeout=60_000)
            loader = threading.Thread(target=load, daemon=True)
            loader.start()
            cpu0, t0, sent0 = proc.cpu_times(), time.monotonic(), sent[0]
            lags = []
            probe = 0
            while time.monotonic() - t0 < args.seconds:
                probe += 1
                power = 100.0 + probe  # a figure no other record carries (shown to 0.1 W)
                published = time.monotonic()
                pub.send("probe-0", "telemetry", telemetry("probe-0", "lab", probe, time.time(), 10 * probe,
                                                           power_w=power))
                page.wait_for_selector(f'tr[data-device="probe-0"] td.power:text("{power:.1f} W")', timeout=30_000)
                lags.append(time.monotonic() - published)
                time.sleep(max(0.0, 1.0 - lags[-1]))
            elapsed = time.monotonic() - t0
            cpu1 = proc.cpu_times()
            sent_n = sent[0] - sent0
            rows = page.locator("tr[data-device]").count()
            stop.set()
            loader.join()
            browser.close()
        rss = proc.memory_info().rss
        view.terminate()
        view.wait(30)
        pub.close()
        broker.stop()
    lags.sort()
    print(json.dumps({
        "devices": args.devices + 1, "rows_shown": rows, "interval_s": args.interval, "seconds": round(elapsed, 1),
        "telemetry_msgs_per_s": round(sent_n / elapsed, 1),
        "lag_ms": {"p50": round(1000 * statistics.median(lags)),
                   "p95": round(1000 * lags[int(0.95 * (len(lags) - 1))]),
                   "max": round(1000 * lags[-1]), "probes": len(lags)},
        "hub_view_cpu_pct_of_one_core": round(100 * (sum(cpu1[:2]) - sum(cpu0[:2])) / elapsed, 1),
        "hub_view_rss_mb": round(rss / 2**20, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
