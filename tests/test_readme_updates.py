"""The README's update-loop command, run as written: the whole signed-update loop on one machine."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_the_readme_update_loop_runs_as_written() -> None:
    readme = (REPO / "README.md").read_text()
    assert "scripts/setup.sh && scripts/demo-updates.sh" in readme
    done = subprocess.run(
        ["scripts/demo-updates.sh"], check=False, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = [
        line.rsplit("-> ", 1)[1]
        for line in done.stdout.splitlines()
        if line.startswith("demo-device: all-minilm-l6-v2 int8-1.0.0-r2 -> ")
    ]
    assert steps == ["queued", "downloading", "verifying", "staged", "activating", "health-check", "active"]
    assert "serving all-minilm-l6-v2 version int8-1.0.0-r2" in done.stdout
