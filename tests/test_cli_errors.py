"""CLI errors as an operator meets them: one line on stderr that says what to do, a non-zero exit,
never a traceback; and what the line says to run, run as written, works."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

EDGEFLEET = [sys.executable, "-m", "agent"]


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGEFLEET, *args], check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "EDGEFLEET_CONFIG": "", **(env or {})})


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_hub_serve_on_a_busy_port_says_so_in_one_line(tmp_path: Path) -> None:
    assert run("hub", "init", "--hub", str(tmp_path / "hub")).returncode == 0
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("hub", "serve", "--hub", str(tmp_path / "hub"), "--port", str(port))
    assert result.returncode == 1
    line = one_line(result)
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in line, line
    assert "--port" in line  # what to do


def test_not_a_hub_names_the_command_that_makes_one_and_that_command_works(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    result = run("hub", "serve", "--hub", str(hub))
    assert result.returncode == 1
    line = one_line(result)
    assert f"{hub} is not a hub" in line
    suggested = re.search(r"`(edgefleet hub init [^`]*)`", line)
    assert suggested, line
    argv = shlex.split(suggested.group(1))
    made = run(*argv[1:])  # as written, but through this checkout's python
    assert made.returncode == 0, made.stderr
    assert (hub / "hub.json").is_file() and (hub / "trust-root.json").is_file()
