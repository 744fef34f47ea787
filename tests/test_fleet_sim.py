"""The fleet bench, small: simulated devices on the real sync stack take a staged rollout
through `edgefleet hub rollout start` and `hub control`, a real mosquitto and `hub serve`.

Not a timed test: bench/bench_fleet.py's figures go to docs/performance.md; here it runs
with a handful of devices and a 1 MiB release to check what the bench checks (every device
active, no job or report pending, no update report lost; the abort reached and undone), so
the simulator keeps running the agent's own contexts as they change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run_bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "figures.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_fleet.py"), "--size-mb", "1", "--per-worker", "20",
         "--timeout-s", "150", "--workdir", str(tmp_path),
         "--sys-wait-s", "0", *args],  # the broker's $SYS rates are figures for the bench, not checked here
        capture_output=True, text=True, timeout=400, env={**os.environ, "FLEET_BENCH_JSON": str(out)}, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "check: every device active" in proc.stdout, proc.stdout
    return json.loads(out.read_text().splitlines()[-1])


def test_simulated_fleet_takes_a_rollout_and_survives_a_broker_restart(tmp_path: Path) -> None:
    figures = run_bench(tmp_path, "--devices", "6", "--fault", "broker-restart", "--outage-s", "1")
    assert figures["active"] == 6 and figures["seconds"] is not None
    assert figures["restarted_at_s"] is not None and figures["disconnects"] >= 6
    assert figures["stuck"] == [] and figures["not_active"] == [] and figures["report_gaps"] == {}
    assert figures["hub_written"] >= 6 << 20  # each device downloaded its own copy from `hub serve`
    assert figures["rollout_state"] == "completed"
    assert not any(Path(tmp_path).glob("fleet-*")), "the state directories were not deleted"


def test_failing_probes_abort_the_rollout_and_every_moved_device_goes_back(tmp_path: Path) -> None:
    # 40 devices, 2 of them (every 20th) fail: any step holding one is past 2 %
    figures = run_bench(tmp_path, "--devices", "40", "--fault", "probe")
    abort = figures["abort"]
    assert abort["state"] == "aborted", abort
    assert abort["stopped_at_step"] == abort["first_step_past_threshold"], abort
    assert abort["moved_not_back"] == []
    assert figures["not_active"] == [] and figures["stuck"] == []  # every device on version 1 again
