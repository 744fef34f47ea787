"""Regenerate the fleet view's screenshots under docs/img/ (docs/operations.md, "Fleet view").

    .venv/bin/python docs/screenshots.py

A throwaway mosquitto and `edgefleet hub view`; a realistic fleet of 36 simulated devices
(tests/fleet_view_sim.py: the real message schemas) with some offline, behind, refused,
unreachable and hot; a rollout status published the way `hub control` publishes it
(sync/hub/rollouts/topic.py); a minute of telemetry history for the device page. Chromium
is Debian's (/usr/bin/chromium). The PNGs are written with a fixed viewport, so they change
only when the page does.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fleet_view_sim import EMBED, Publisher, realistic_fleet, telemetry, wave  # noqa: E402
from mqtt_broker import MosquittoBroker, free_port  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from sync.hub.rollouts.record import Plan, RolloutRecord  # noqa: E402
from sync.hub.rollouts.topic import rollout_body, rollout_message, rollout_topic  # noqa: E402

OUT = ROOT / "docs/img"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        broker = MosquittoBroker(Path(tmp))
        broker.start()
        port = free_port()
        view = subprocess.Popen([sys.executable, "-m", "agent", "hub", "view", "--mqtt", f"127.0.0.1:{broker.port}",
                                 "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(2)
            pub = Publisher("127.0.0.1", broker.port)
            ids = realistic_fleet(pub, 36)
            now = time.time()
            record = RolloutRecord(id="r-3f9a2c", group="shop-floor", model=EMBED, from_version="1", to_version="2",
                                   to_files={}, plan=Plan([1.0, 10.0, 50.0, 100.0], 600.0, 0.1, 5, 1800.0),
                                   salt="3f9a2c1b77e0d4aa", serial=5, step=2, step_started_at=now - 240,
                                   created_at=now - 1500)
            record.counts = {"pending": 0, "in-progress": 1, "succeeded": 5, "failed": 0, "no-report": 0,
                             "offline": 0, "unexpected": 0, "in_step": 6}
            record.decision, record.note = "wait", "1 device(s) of step 3 not done yet"
            record.history = [{"at": now - 1500, "event": "step", "step": 1, "percent": 1.0},
                              {"at": now - 900, "event": "step", "step": 2, "percent": 10.0},
                              {"at": now - 240, "event": "step", "step": 3, "percent": 50.0}]
            pub.raw(rollout_topic("edgefleet/v1", record.id), rollout_message(rollout_body(record)), retain=True)
            device = ids[0]
            for k in range(60):  # a minute of history for one device, every second
                t = time.time() - 60 + k
                pub.send(device, "telemetry", telemetry(device, "shop-floor", 10 + k, t, 4000 + 300 * k + int(
                    200 * wave(k, 20)), power_w=round(5 + 6 * wave(k, 30), 2), temp_c=round(55 + 10 * wave(k, 40), 1),
                    mem_used=1.6e9 + 4e8 * wave(k, 50), jpt=round(0.3 + 0.2 * wave(k, 25), 3)))
            time.sleep(2.5)  # the history is written in batches
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_selector(f'tr[data-device="{ids[-1]}"]')
                page.screenshot(path=str(OUT / "fleet-view.png"))
                page.select_option("#f-problem", "any")
                page.screenshot(path=str(OUT / "fleet-view-problems.png"))
                page.goto(f"http://127.0.0.1:{port}/devices/{device}")
                page.wait_for_selector('.chart[data-chart="power (W)"] polyline')
                page.screenshot(path=str(OUT / "fleet-view-device.png"), full_page=True)
                browser.close()
            pub.close()
        finally:
            view.terminate()
            view.wait(30)
            broker.stop()
    for png in sorted(OUT.glob("fleet-view*.png")):
        print(f"{png.relative_to(ROOT)}: {png.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
