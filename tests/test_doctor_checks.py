"""`edgefleet doctor` on what an admin sets up: a fresh machine, the ports, a real mosquitto with
accounts, a real `edgefleet hub serve`. Each problem is one [FAIL] line with a `fix:` line, as
the admin reads them; the command itself runs as they run it (a process, its exit status)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EMBED, free_port
from mqtt_broker import MosquittoBroker
from service_process import ServiceProcess, write_config

EDGEFLEET = [sys.executable, "-m", "agent"]


def doctor(tmp_path: Path, text: str, name: str = "agent.toml") -> tuple[int, str]:
    config = tmp_path / name
    config.write_text(text)
    done = subprocess.run([*EDGEFLEET, "doctor", "--config", str(config)], capture_output=True, text=True,
                          check=False, timeout=120, env={**os.environ, "EDGEFLEET_CONFIG": ""})
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    return done.returncode, done.stdout


def finding(out: str, check: str) -> list[str]:
    """The lines of each finding of `check`: "[level] check: detail" and its "fix: …" line."""
    lines = out.splitlines()
    found = []
    for i, line in enumerate(lines):
        if line[7:].startswith(f"{check}:"):
            fix = lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1].strip().startswith("fix:") else ""
            found.append(f"{line}\n{fix}")
    assert found, f"no {check} finding in:\n{out}"
    return found


def base_config(tmp_path: Path, port: int | None = None) -> str:
    return f'state_dir = "{tmp_path / "state"}"\n[server]\nport = {port or free_port()}\n'


def test_a_fresh_machine_is_not_a_failure_the_state_dir_is_made_at_first_start(tmp_path: Path) -> None:
    state = tmp_path / "var" / "lib" / "edgefleet"
    code, out = doctor(tmp_path, f'state_dir = "{state}"\n[server]\nport = {free_port()}\n')
    assert code == 0, out
    assert f"[ok  ] state dir: {state} does not exist yet; the agent makes it at its first start" in out
    assert "no problems found" in out
    assert not state.exists()  # doctor looks; it does not make it


def test_busy_ports_are_named_with_a_fix(tmp_path: Path) -> None:
    with socket.socket() as http, socket.socket() as grpc:
        for sock in (http, grpc):
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        port, grpc_port = http.getsockname()[1], grpc.getsockname()[1]
        code, out = doctor(tmp_path, base_config(tmp_path, port) + f"grpc_port = {grpc_port}\n")
    assert code == 1
    [http_line] = finding(out, "server.port")
    assert f"[FAIL] server.port: 127.0.0.1:{port} is in use by another program" in http_line
    assert "fix: stop it" in http_line and "--port" in http_line
    [grpc_line] = finding(out, "server.grpc_port")
    assert f"[FAIL] server.grpc_port: 127.0.0.1:{grpc_port} is in use" in grpc_line and "fix:" in grpc_line


@pytest.mark.slow
async def test_the_ports_of_the_running_agent_are_not_a_problem(tmp_path: Path, state_dir: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "serve.toml", state_dir, port, [EMBED])
    agent = ServiceProcess(config, tmp_path)
    try:
        await agent.notify.wait_for("READY", "1")
        done = subprocess.run([*EDGEFLEET, "doctor", "--config", str(config)], capture_output=True, text=True,
                              check=False, timeout=120, env={**os.environ, "EDGEFLEET_CONFIG": ""})
        assert done.returncode == 0, done.stdout
        assert (f"[ok  ] server.port: 127.0.0.1:{port} is in use, by the running agent (pid {agent.proc.pid}"
                in done.stdout), done.stdout
        assert f"in use by the running agent (pid {agent.proc.pid})" in finding(done.stdout, "state dir")[0]
        agent.signal(signal.SIGTERM)
        assert await agent.wait_exit(30) == 0
    finally:
        agent.stop()


# ---- [mqtt] against a real mosquitto with accounts ----

@pytest.fixture
def broker_with_accounts(tmp_path: Path) -> Iterator[MosquittoBroker]:
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "press-7", "correct horse"], check=True)
    broker = MosquittoBroker(tmp_path)
    broker.extra_config = f"listener {broker.port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\n"
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def mqtt_config(tmp_path: Path, broker: MosquittoBroker, password_file: Path, **extra: str) -> str:
    lines = [f'{key} = "{value}"' for key, value in extra.items()]
    return (base_config(tmp_path) + f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nusername = "press-7"\n'
            f'password_file = "{password_file}"\ndevice_id = "press-7"\ngroup = "lab"\n' + "\n".join(lines) + "\n")


def test_mqtt_the_broker_accepts_the_device_or_doctor_says_why_not(
        tmp_path: Path, broker_with_accounts: MosquittoBroker) -> None:
    broker = broker_with_accounts
    good, wrong = tmp_path / "good-password", tmp_path / "wrong-password"
    good.write_text("correct horse\n")
    wrong.write_text("battery staple\n")

    code, out = doctor(tmp_path, mqtt_config(tmp_path, broker, good))
    assert code == 0, out
    assert (f"[ok  ] mqtt: connected to 127.0.0.1:{broker.port} as press-7 (device press-7, group lab)"
            in finding(out, "mqtt")[0])

    code, out = doctor(tmp_path, mqtt_config(tmp_path, broker, wrong))
    assert code == 1
    [line] = finding(out, "mqtt")
    assert f"[FAIL] mqtt: broker 127.0.0.1:{broker.port} refused this device:" in line
    assert "fix: check mqtt.username and mqtt.password_file" in line

    code, out = doctor(tmp_path, mqtt_config(tmp_path, broker, tmp_path / "no-such-file"))
    assert code == 1
    [line] = finding(out, "mqtt")
    assert f"mqtt.password_file {tmp_path / 'no-such-file'}" in line and "fix: make the file readable" in line

    code, out = doctor(tmp_path, mqtt_config(tmp_path, broker, good, ca_file=str(tmp_path / "ca.pem")).replace(
        "[mqtt]\n", "[mqtt]\ntls = true\n"))
    assert code == 1
    [line] = finding(out, "mqtt")
    assert f"mqtt.ca_file {tmp_path / 'ca.pem'}" in line and "fix:" in line

    broker.stop()
    code, out = doctor(tmp_path, mqtt_config(tmp_path, broker, good))
    assert code == 1
    [line] = finding(out, "mqtt")
    assert f"[FAIL] mqtt: broker 127.0.0.1:{broker.port} unreachable: Connection refused" in line
    assert "fix: check mqtt.host and mqtt.port and that the broker runs" in line


# ---- [updates] against a real `edgefleet hub serve` ----

@pytest.fixture
def served_hub(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A hub made and served by the operator's own commands; (its directory, the hub_url for agents)."""
    hub = tmp_path / "hub"
    subprocess.run([*EDGEFLEET, "hub", "init", "--hub", str(hub)], check=True, capture_output=True, timeout=60)
    port = free_port()
    proc = subprocess.Popen([*EDGEFLEET, "hub", "serve", "--hub", str(hub), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "hub serve did not listen"
                time.sleep(0.1)
        yield hub, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def updates_config(tmp_path: Path, hub_url: str, trust_root: Path) -> str:
    return base_config(tmp_path) + f'[updates]\nhub_url = "{hub_url}"\ntrust_root = "{trust_root}"\n'


def test_updates_the_hub_answers_and_verifies_against_the_trust_root_or_doctor_says_why_not(
        tmp_path: Path, served_hub: tuple[Path, str]) -> None:
    hub, url = served_hub
    root = hub / "trust-root.json"

    code, out = doctor(tmp_path, updates_config(tmp_path, url, root))
    assert code == 0, out
    lines = finding(out, "updates")
    assert f"[ok  ] updates: trust root {root}: root v1, valid" in lines[0]
    assert f"[ok  ] updates: hub {url}: metadata verified" in lines[1]

    code, out = doctor(tmp_path, updates_config(tmp_path, url, tmp_path / "root.json"))
    assert code == 1
    [line] = finding(out, "updates")
    assert f"[FAIL] updates: trust root {tmp_path / 'root.json'}: No such file or directory" in line
    assert "fix: copy the hub's trust-root.json there" in line

    (tmp_path / "garbage.json").write_text('{"signed": {}}')
    code, out = doctor(tmp_path, updates_config(tmp_path, url, tmp_path / "garbage.json"))
    assert code == 1 and "not TUF root metadata" in finding(out, "updates")[0]

    other = tmp_path / "other-hub"
    subprocess.run([*EDGEFLEET, "hub", "init", "--hub", str(other)], check=True, capture_output=True, timeout=60)
    code, out = doctor(tmp_path, updates_config(tmp_path, url, other / "trust-root.json"))
    assert code == 1
    line = finding(out, "updates")[1]
    assert f"[FAIL] updates: hub {url}:" in line and "fix: the trust root is another hub's" in line

    code, out = doctor(tmp_path, updates_config(tmp_path, url + "/repository", root))
    assert code == 1
    line = finding(out, "updates")[1]
    assert "unreachable" in line and "HTTP 404" in line and "fix: check updates.hub_url" in line

    dead = f"http://127.0.0.1:{free_port()}"
    code, out = doctor(tmp_path, updates_config(tmp_path, dead, root))
    assert code == 1
    line = finding(out, "updates")[1]
    assert f"[FAIL] updates: hub {dead} unreachable" in line and "fix: check updates.hub_url" in line
