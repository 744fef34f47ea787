"""What `edgefleet hub publish` tells the operator when no doorbell rings: a connected agent
never polls, so the message must say exactly what makes the release arrive, and must not
promise a periodic check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EMBED, free_port
from update_env import create_hub, embedding_state, make_release

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = embedding_state(tmp_path_factory.mktemp("publish-cli"))
    create_hub(root / "hub", root / "state", (EMBED,))
    return root


def publish(env: Path, version: str, *args: str) -> subprocess.CompletedProcess[str]:
    release = make_release(env / "state/models" / EMBED / "current", env / f"r-{version}", version,
                           onnx_note=f"release {version}")
    return subprocess.run(
        [sys.executable, "-m", "agent", "hub", "publish", "--hub", str(env / "hub"), "--group", "lab",
         f"{EMBED}={release}", *args],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=120,
    )


def says_when_agents_find_it(out: str) -> None:
    assert "next poll" not in out, out
    assert "reconnect" in out and "check-now" in out and "edgefleet/v1/devices/<id>/cmd" in out, out
    assert "restart" in out and "poll_interval_s" in out and "not connected" in out, out
    assert "check_interval_s" in out, out  # connected agents look on their timer too


def test_no_doorbell_says_exactly_when_agents_will_find_the_release(env: Path) -> None:
    done = publish(env, "2", "--no-doorbell")
    assert done.returncode == 0, done.stderr
    assert "published group lab serial 2" in done.stdout
    says_when_agents_find_it(done.stdout)


def test_a_doorbell_that_cannot_ring_says_the_same(env: Path) -> None:
    done = publish(env, "3", "--mqtt", f"127.0.0.1:{free_port()}")  # nobody listens there
    assert done.returncode == 0, done.stderr
    assert "doorbell not rung" in done.stdout
    says_when_agents_find_it(done.stdout)


def test_the_help_promises_no_poll() -> None:
    done = subprocess.run([sys.executable, "-m", "agent", "hub", "publish", "--help"], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--no-doorbell" in done.stdout
    assert "next poll" not in " ".join(done.stdout.split())
