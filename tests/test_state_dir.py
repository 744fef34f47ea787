"""The state dir as an admin gets it wrong: one the agent's user cannot read, a file in its
place, two agents (or an agent and a CLI command) on one state dir. Real `edgefleet`
processes; what is checked is what the admin sees: exit status, the one line on stderr,
/readyz and what systemd hears.

Tests run as root, for whom permission bits do not stop a read, so the agent is started
without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (`setpriv --bounding-set`) and the
directory it must not read belongs to `nobody`, mode 0700: the agent then meets the
permission bits as the package's `edgefleet` user would.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from agent_process import serve
from conftest import CHAT, EMBED, free_port
from service_process import ServiceProcess, write_config

from agent.cli.demo import build_demo_bundles

PYTHON_AGENT = [sys.executable, "-m", "agent"]
NOBODY = 65534


def as_the_agents_user() -> list[str]:
    """The command prefix under which permission bits apply to this test's agent."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: permission bits cannot be made to apply")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


def lock_out(path: Path) -> None:
    """Make directory `path` unreadable to the agent (not recursive: the files may be hard links)."""
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)
        os.chmod(path, 0o700)
    else:
        os.chmod(path, 0)


def run(*args: str, prefix: list[str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), *PYTHON_AGENT, *args], check=False, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "EDGEFLEET_CONFIG": ""})


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("edgefleet:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def own_state(tmp_path: Path) -> Path:
    """A state dir of this test's own with the demo bundles (hard links: cheap)."""
    state = tmp_path / "state"
    build_demo_bundles(state / "models")
    return state


@pytest.fixture
def unreadable_state(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "locked" / "state"
    state.mkdir(parents=True)
    (state / "models").mkdir()
    lock_out(state)
    yield state
    os.chmod(state, 0o700)


# ---- 9: a state dir the agent cannot use ----

async def test_serve_with_an_unreadable_state_dir_fails_at_once_in_one_line_and_never_says_ready(
        tmp_path: Path, unreadable_state: Path) -> None:
    port = free_port()
    agent = ServiceProcess(write_config(tmp_path / "agent.toml", unreadable_state, port, [CHAT]), tmp_path,
                           command=[*as_the_agents_user(), *PYTHON_AGENT])
    try:
        code = await agent.wait_exit(timeout=60)
        log = agent.log()
    finally:
        agent.stop()
    assert code != 0, log
    line = one_line(log)
    assert str(unreadable_state) in line and "no read, write, enter (x) permission" in line, line
    assert "listening" not in log
    assert not agent.notify.with_key("READY")  # systemd sees the process fail, not a start that never ends


def test_serve_demo_and_doctor_with_an_unreadable_state_dir_name_the_path_and_the_permission(
        unreadable_state: Path) -> None:
    prefix = as_the_agents_user()
    demo = run("serve", "--demo", "--state-dir", str(unreadable_state), "--port", str(free_port()),
               "--grpc-port", str(free_port()), prefix=prefix)
    assert demo.returncode == 1
    line = one_line(demo.stderr)
    assert str(unreadable_state) in line and "permission" in line, line
    doctor = run("doctor", "--state-dir", str(unreadable_state), prefix=prefix)
    assert "Traceback" not in doctor.stdout + doctor.stderr, doctor.stdout + doctor.stderr
    assert doctor.returncode == 1
    assert f"[FAIL] state dir: {unreadable_state}" in doctor.stdout and "permission" in doctor.stdout, doctor.stdout
    assert "fix: give it to the user the agent runs as" in doctor.stdout, doctor.stdout


def test_a_file_where_the_state_dir_should_be_is_one_line_for_serve_and_doctor(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("not a directory\n")
    for args in (["serve"], ["serve", "--demo", "--grpc-port", str(free_port())]):
        result = run(*args, "--state-dir", str(state), "--port", str(free_port()))
        assert result.returncode == 1, result.stderr
        assert f"state dir {state} is not a directory" in one_line(result.stderr)
    doctor = run("doctor", "--state-dir", str(state))
    assert doctor.returncode == 1 and "Traceback" not in doctor.stdout + doctor.stderr
    assert f"[FAIL] state dir: {state} is not a directory" in doctor.stdout, doctor.stdout


async def test_a_model_the_agent_cannot_read_is_failed_in_readyz_not_missing(tmp_path: Path, own_state: Path) -> None:
    """The state dir is fine but one model's folder is not: the others serve, /readyz says 503 and
    names it, and systemd hears READY with the failure in the status line (it never hangs)."""
    lock_out(own_state / "models" / CHAT)
    port = free_port()
    agent = ServiceProcess(write_config(tmp_path / "agent.toml", own_state, port, [CHAT, EMBED]), tmp_path,
                           command=[*as_the_agents_user(), *PYTHON_AGENT])
    try:
        ready = await agent.notify.wait_for("READY", "1", timeout=90)
        assert ready.fields["STATUS"] == f"serving 1 model(s): {EMBED}; failed: {CHAT} (see the log)", agent.log()
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as resp:
            assert resp.status == 503
            body = await resp.json()
        states = {m["name"]: m for m in body["models"]}
        assert body["status"] == "not ready" and states[CHAT]["state"] == "failed", body
        reason = states[CHAT]["reason"]
        assert "Permission denied" in reason and str(own_state / "models" / CHAT) in reason, reason
        assert states[EMBED]["state"] == "ready"
        assert "Traceback" not in agent.log()
        agent.signal(signal.SIGTERM)
        assert await agent.wait_exit(timeout=30) == 0
    finally:
        agent.stop()
        os.chmod(own_state / "models" / CHAT, 0o755)


# ---- 16: one process at a time on a state dir ----

def in_progress_install(state: Path) -> list[Path]:
    """What an update or a demo build leaves while it works: a temp blob in the store and a
    half-built version in the model's folder (the names the store's recovery removes)."""
    temp_blob = state / "store" / ".tmp-download-in-progress"
    temp_blob.write_bytes(b"half a model")
    half_built = state / "models" / EMBED / ".incoming-2"
    half_built.mkdir()
    (half_built / "model.toml").write_text("format = 'onnx'\n")
    return [temp_blob, half_built]


async def test_a_second_agent_on_the_same_state_dir_is_refused_and_leaves_the_first_ones_work_alone(
        tmp_path: Path, own_state: Path) -> None:
    with serve(own_state, tmp_path) as first:
        work = in_progress_install(own_state)
        second = await asyncio.to_thread(
            run, "serve", "--demo", "--state-dir", str(own_state), "--port", str(free_port()),
            "--grpc-port", str(free_port()))
        assert second.returncode == 1
        line = one_line(second.stderr)
        assert f"state dir {own_state} is in use by another edgefleet process, pid {first.proc.pid}" in line, line
        assert "listening" not in second.stderr
        assert all(path.exists() for path in work), "the second agent's start-up removed the first one's work"
        async with aiohttp.ClientSession() as http, http.get(first.url + "/readyz") as resp:
            assert resp.status == 200  # the first one serves on
        code, _ = first.terminate()
        assert code == 0
    # the kernel dropped the lock with its holder: the next one starts
    rebuilt = run("demo", "build", "--state-dir", str(own_state))
    assert rebuilt.returncode == 0, rebuilt.stderr


async def test_cli_commands_that_write_the_store_are_refused_while_an_agent_runs(
        tmp_path: Path, own_state: Path) -> None:
    config = tmp_path / "fetch.toml"
    config.write_text(f'state_dir = "{own_state}"\n[mqtt]\nhost = "127.0.0.1"\nport = {free_port()}\n'
                      f'[updates]\nhub_url = "http://127.0.0.1:{free_port()}"\n'
                      f'trust_root = "{tmp_path / "root.json"}"\n')
    with serve(own_state, tmp_path) as agent:
        work = in_progress_install(own_state)
        for args in (["demo", "build", "--state-dir", str(own_state)],
                     ["models", "fetch", "--config", str(config)],
                     ["models", "list", "--demo", "--state-dir", str(own_state)]):
            result = await asyncio.to_thread(run, *args)
            assert result.returncode == 1, (args, result.stderr)
            line = one_line(result.stderr)
            assert f"in use by another edgefleet process, pid {agent.proc.pid} (`edgefleet serve`)" in line, line
        assert all(path.exists() for path in work)
        # reading is fine beside it
        listing = await asyncio.to_thread(run, "models", "list", "--state-dir", str(own_state))
        assert listing.returncode == 0, listing.stderr
