"""The `edgefleet` command as an operator runs it: real processes, real ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from conftest import CHAT, EMBED, free_port

EDGEFLEET = [sys.executable, "-m", "agent"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEFLEET, *args], check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text("[server]\nport = 'x'\n")
    result = run("serve", "--config", str(config))
    assert result.returncode == 2
    assert "server.port: expected an integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_command_is_a_usage_error():
    result = run("fly")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_models_list_shows_bundles_and_flags_broken_ones(tmp_path, state_dir):
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{state_dir}"\n[[models]]\nname = "{CHAT}"\n[[models]]\nname = "ghost"\n')
    result = run("models", "list", "--config", str(config), "--json")
    assert result.returncode == 1  # one bundle is missing
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows[CHAT]["format"] == "gguf" and rows[CHAT]["size_bytes"] > 90_000_000
    assert "not a model bundle" in rows["ghost"]["error"]


def test_serve_demo_answers_curl_and_stops_cleanly_on_sigterm(tmp_path, state_dir):
    port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([*EDGEFLEET, "serve", "--demo", "--state-dir", str(state_dir), "--port", str(port),
                             "--grpc-port", str(grpc_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "EDGEFLEET_CONFIG": ""})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "agent did not become ready"
            time.sleep(0.2)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps({"model": CHAT, "messages": [{"role": "user", "content": "Hello!"}],
                             "max_tokens": 8}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert json.load(resp)["choices"][0]["message"]["content"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as resp:
            assert {m["id"] for m in json.load(resp)["data"]} == {CHAT, EMBED}
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "listening on http://127.0.0.1" in output and "stopped" in output
    assert f"KServe v2 gRPC listening on 127.0.0.1:{grpc_port}" in output
    assert "Traceback" not in output


def test_demo_turns_grpc_on_at_8081_unless_told_otherwise(state_dir):
    from agent.cli.main import _load, _parser

    def grpc_port(*argv: str) -> int | None:
        return _load(_parser().parse_args(["serve", "--state-dir", str(state_dir), *argv])).server.grpc_port

    assert grpc_port("--demo") == 8081
    assert grpc_port() is None  # off unless configured
    assert grpc_port("--grpc-port", "9001") == 9001
    assert grpc_port("--demo", "--grpc-port", "0") == 0


def test_grpc_port_in_use_is_a_clear_error(state_dir):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        grpc_port = busy.getsockname()[1]
        result = run("serve", "--state-dir", str(state_dir), "--port", str(free_port()),
                     "--grpc-port", str(grpc_port), env={"EDGEFLEET_CONFIG": ""})
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{grpc_port}" in result.stderr and "Traceback" not in result.stderr


def test_port_in_use_is_a_clear_error(state_dir):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("serve", "--state-dir", str(state_dir), "--port", str(port), env={"EDGEFLEET_CONFIG": ""})
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr
    # one line that says what to do, without asyncio's own sentence around the reason
    [line] = [line for line in result.stderr.splitlines() if line.startswith("edgefleet:")]
    assert line.endswith(f"cannot listen on 127.0.0.1:{port}: address already in use (stop what uses it, "
                         "or choose another server.port / --port)"), line


def test_the_hubs_and_the_builds_variables_do_not_break_the_agents_commands(tmp_path):
    """`hub …` reads EDGEFLEET_HUB and EDGEFLEET_HUB_MQTT, build-deb.sh EDGEFLEET_WHEEL_CACHE; an
    operator's shell has them set when they run the agent's commands too."""
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    env = {"EDGEFLEET_HUB": str(tmp_path / "hub"), "EDGEFLEET_HUB_MQTT": "127.0.0.1:1883",
           "EDGEFLEET_WHEEL_CACHE": str(tmp_path / "wheels"), "EDGEFLEET_CONFIG": ""}
    listing = run("models", "list", "--config", str(config), env=env)
    assert listing.returncode == 0 and "no models configured" in listing.stdout, listing.stderr
    doctor = run("doctor", "--config", str(config), env=env)
    assert "[ok  ] config: valid" in doctor.stdout and "unknown key" not in doctor.stdout, doctor.stdout
