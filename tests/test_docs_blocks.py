"""Every code block in docs/ and the README, run, so the pages stay true (as the README's tour is).

Each fenced block gets one test. How a block is run is chosen by its page and its first line:

- Python is run in a fresh interpreter, as a reader pastes it, against a live agent (ports
  substituted); a ``# float32, shape (…)`` comment on the last line is checked too.
- Shell commands run through bash, as written, with only host names, ports and paths
  substituted (``/srv/edgefleet-hub`` becomes a temporary directory). operations.md's signed-
  update walkthrough runs in order: `hub init`, `hub serve`, `hub refresh`, the provisioning
  config, `hub publish`, `hub status`, `hub rotate-key`, with a real mosquitto, a real
  `hub serve` and a real agent that takes the release.
- TOML is loaded by the loader that reads it (the agent's config, or a bundle's model.toml);
  JSON is parsed (``…`` elisions allowed), and where the agent or the hub produces it, a real
  one is compared with it.
- A block that cannot run here (systemd, apt, a package build, a diagram) is skipped with its
  reason, which the test report shows; a new block with no runner and no reason fails, so
  nothing is left out silently.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from agent_process import AgentProcess, serve
from conftest import CHAT, EMBED, free_port
from mqtt_broker import MosquittoBroker, Watcher
from update_env import make_release

from agent.cli.demo import build_demo_bundles
from agent.config import AgentConfig, load_config

REPO = Path(__file__).resolve().parent.parent
PAGES = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]


@dataclass(frozen=True)
class Block:
    page: str  # "docs/api.md"
    line: int  # of the opening fence
    lang: str
    text: str

    @property
    def first(self) -> str:
        return next((line.strip() for line in self.text.splitlines() if line.strip()), "")

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}:{self.lang or 'text'}"


def blocks() -> list[Block]:
    found = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            opening = re.fullmatch(r"```(\w*)\s*", lines[i])
            if opening:
                end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
                found.append(Block(str(page.relative_to(REPO)), i + 1, opening.group(1),
                                   "\n".join(lines[i + 1:end]) + "\n"))
                i = end
            i += 1
    return found


BLOCKS = blocks()


# ---- shared live things -------------------------------------------------------------------

@pytest.fixture(scope="module")
def docs_agent(state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """An agent serving both demo models, HTTP and gRPC, for the pages' client examples."""
    with serve(state_dir, tmp_path_factory.mktemp("docs-agent")) as running:
        yield running


def shim_bin(directory: Path) -> Path:
    """A directory with an `edgefleet` that runs this checkout, to put first on PATH."""
    directory.mkdir(parents=True, exist_ok=True)
    shim = directory / "edgefleet"
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO}" exec "{sys.executable}" -m agent "$@"\n')
    shim.chmod(0o755)
    return directory


def shell_env(bin_dir: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "EDGEFLEET_CONFIG": "", **extra}


def commands(text: str) -> list[str]:
    """The block's commands, continuation lines joined, comment-only lines dropped."""
    joined = text.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def sh(command: str, cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.2)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def ready(url: str) -> bool:
    try:
        return get(url + "/readyz")[0] == 200
    except OSError:
        return False


# ---- JSON and TOML ---------------------------------------------------------------------------

def parse_json(text: str) -> Any:
    """A page's JSON, with its elisions: `[…]`, `[ … ]`, `, …]` and `"…"`."""
    text = re.sub(r",\s*…\s*\]", "]", text)
    text = re.sub(r"\[\s*…\s*\]", "[]", text)
    return json.loads(text)


def keys_documented_are_real(documented: dict[str, Any], real: dict[str, Any], where: str = "") -> None:
    """Every field the page shows is in the real answer, with the same kind of value, recursively
    into objects and the first element of arrays."""
    for key, value in documented.items():
        assert key in real, f"the page shows {where}{key}, the agent does not send it: {sorted(real)}"
        if isinstance(value, dict) and isinstance(real[key], dict):
            keys_documented_are_real(value, real[key], f"{where}{key}.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            assert isinstance(real[key], list) and real[key], f"{where}{key}: empty in the real answer"
            keys_documented_are_real(value[0], real[key][0], f"{where}{key}[0].")


def check_json_error_example(block: Block, request: pytest.FixtureRequest) -> None:
    agent: AgentProcess = request.getfixturevalue("docs_agent")
    shown = parse_json(block.text)
    temperature = int(re.search(r"got (\d+)", shown["error"]["message"]).group(1))  # type: ignore[union-attr]
    status, body = post(agent.url + "/v1/chat/completions", {
        "model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "temperature": temperature})
    assert status == 400 and body == shown, body


def check_json_against(path: str, body: dict[str, Any] | None) -> Callable[[Block, pytest.FixtureRequest], None]:
    def check(block: Block, request: pytest.FixtureRequest) -> None:
        agent: AgentProcess = request.getfixturevalue("docs_agent")
        status, real = post(agent.url + path, body) if body is not None else get(agent.url + path)
        assert status == 200, real
        keys_documented_are_real(parse_json(block.text), real)

    return check


INFER = {"id": "req-1", "inputs": [
    {"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [101, 7592, 102]},
    {"name": "attention_mask", "shape": [1, 3], "datatype": "INT64", "data": [1, 1, 1]},
    {"name": "token_type_ids", "shape": [1, 3], "datatype": "INT64", "data": [0, 0, 0]}]}


def check_infer_example(block: Block, request: pytest.FixtureRequest) -> None:
    agent: AgentProcess = request.getfixturevalue("docs_agent")
    status, real = post(agent.url + f"/v2/models/{EMBED}/infer", INFER)
    assert status == 200, real
    shown = parse_json(block.text)
    keys_documented_are_real(shown, real)
    assert {k: real["outputs"][0][k] for k in ("name", "datatype", "shape")} == \
        {k: shown["outputs"][0][k] for k in ("name", "datatype", "shape")}
    assert real["id"] == shown["id"] and real["model_name"] == shown["model_name"]


def check_desired_state(block: Block, request: pytest.FixtureRequest) -> None:
    from security.desired import parse_desired

    shown = parse_json(block.text)
    desired = parse_desired(block.text.encode(), shown["scope"], shown["target"])
    assert desired.serial == shown["serial"] and set(desired.models) == set(shown["models"])


def check_doorbell(block: Block, request: pytest.FixtureRequest) -> None:
    walk: Walkthrough = request.getfixturevalue("walkthrough")
    assert walk.doorbell is not None, "the walkthrough's publish rang no doorbell"
    shown = parse_json(block.text)
    assert set(shown) == set(walk.doorbell), walk.doorbell
    assert walk.doorbell["schema"] == shown["schema"]


def agent_config_text(text: str) -> str:
    """A block of agent config, with the placeholders a reader replaces filled in."""
    return text.replace('api_key = "…"', 'api_key = "a-key-of-the-readers-own"')


def check_agent_config(block: Block, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue("tmp_path") / "agent.toml"
    path.write_text(agent_config_text(block.text))
    config = load_config(path, environ={})
    assert isinstance(config, AgentConfig)


#: Values in configuration.md's "Keys" block that are examples, not the defaults.
EXAMPLES_NOT_DEFAULTS = {"state_dir", "server.api_key", "server.grpc_port"}


def check_keys_reference(block: Block, request: pytest.FixtureRequest) -> None:
    """configuration.md's "Keys": loads, shows the defaults, and (with the sections below it)
    names every key the loader knows."""
    check_agent_config(block, request)
    defaults = AgentConfig(state_dir="-")
    shown = tomllib.loads(agent_config_text(block.text))
    for section, values in shown.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if f"{section}.{key}" not in EXAMPLES_NOT_DEFAULTS:
                assert getattr(getattr(defaults, section), key) == value, f"{section}.{key}: the default is " \
                    f"{getattr(getattr(defaults, section), key)!r}, the page says {value!r}"
    page = "".join(b.text for b in BLOCKS if b.page == block.page and b.lang == "toml")
    for item in fields(AgentConfig):
        part = getattr(defaults, item.name)
        names = [f.name for f in fields(part)] if is_dataclass(part) else [item.name]
        missing = [name for name in names if not re.search(rf"\b{name}\b", page)]
        assert not missing, f"configuration.md documents no {item.name}: {missing}"


def check_manifest(block: Block, request: pytest.FixtureRequest) -> None:
    from runtime.bundle import BundleManifest
    from runtime.structured import from_mapping

    data = tomllib.loads(block.text)
    if "format" not in data:  # a part of model.toml ([probe])
        data = {"format": "gguf", "file": "model.gguf", "task": "chat", **data}
    manifest = from_mapping(BundleManifest, data)
    for section in ("gguf", "onnx", "probe"):
        for key, value in data.get(section, {}).items():
            assert getattr(getattr(manifest, section), key) is not None, (section, key, value)


# ---- plain text ------------------------------------------------------------------------------

def without_config_overrides() -> dict[str, str]:
    """This environment without EDGEFLEET_* config keys (conftest sets one), as an operator's shell has."""
    from agent.config import is_config_override

    return {**{k: v for k, v in os.environ.items() if not is_config_override(k)}, "EDGEFLEET_CONFIG": ""}


def check_config_error_line(block: Block, request: pytest.FixtureRequest) -> None:
    tmp_path: Path = request.getfixturevalue("tmp_path")
    shown = block.text.strip()
    path = re.search(r"config error: (\S+): ", shown).group(1)  # type: ignore[union-attr]
    config = tmp_path / "agent.toml"
    config.write_text("[server]\nport = 'eighty'\n")
    done = subprocess.run([sys.executable, "-m", "agent", "serve", "--config", str(config)], capture_output=True,
                          text=True, timeout=60, check=False, env=without_config_overrides(), cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.strip() == shown.replace(path, str(config))


def built_state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    build_demo_bundles(state / "models")
    return state


def check_state_dir_layout(block: Block, request: pytest.FixtureRequest) -> None:
    state = built_state(request.getfixturevalue("tmp_path"))
    for line in block.text.splitlines()[1:]:
        entry = line.split()[0]
        path = state / entry.replace("<name>", EMBED).replace("<version>", "int8-1.0.0").replace("<sha256>", "")
        assert path.exists() or path.is_symlink(), f"{entry}: not in a state dir the demo build made"


def check_models_tree(block: Block, request: pytest.FixtureRequest) -> None:
    models = built_state(request.getfixturevalue("tmp_path")) / "models"
    lines = [line.strip().rstrip("/") for line in block.text.splitlines()[1:] if line.strip()]
    name = lines[0]
    link, _, version = lines[1].partition(" -> ")
    assert (models / name / link).readlink() == Path(version)
    for file in lines[3:]:
        assert (models / name / version / file).is_file(), file


def check_repo_layout(block: Block, request: pytest.FixtureRequest) -> None:
    for line in block.text.splitlines():
        if line.strip():
            assert (REPO / line.split()[0]).is_dir(), line


# ---- Python ----------------------------------------------------------------------------------

def run_python(block: Block, request: pytest.FixtureRequest) -> None:
    agent: AgentProcess = request.getfixturevalue("docs_agent")
    code = block.text.replace("127.0.0.1:8080", f"127.0.0.1:{agent.port}").replace("127.0.0.1:8081", agent.grpc)
    expect = re.search(r"^(\w+) = .*# (\w+), shape (\(.*\))$", block.text.strip().splitlines()[-1])
    if expect:
        code += f"\nprint({expect.group(1)}.dtype, tuple({expect.group(1)}.shape))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=False,
                          cwd=request.getfixturevalue("tmp_path"))
    assert done.returncode == 0, f"{code}\n{done.stderr}"
    if expect:
        assert done.stdout.split("\n")[-2] == f"{expect.group(2)} {expect.group(3)}", done.stdout


def check_link_sketch(block: Block, request: pytest.FixtureRequest) -> None:
    """mqtt.md's summary of the link's API: every name it uses exists, with what it says."""
    from agent.context import MQTT
    from sync.mqtt import MqttSettings
    from sync.mqtt.link import MqttLink

    link = MqttLink(MqttSettings(host="127.0.0.1"))
    assert "app[MQTT]" in block.text and MQTT is not None  # agent/context.py's key, as the sketch says
    for name in re.findall(r"\blink\.(\w+)", block.text):
        assert hasattr(link, name), f"MqttLink has no {name}"
    for name in re.findall(r"\blink\.topics\.(\w+)", block.text):
        assert hasattr(link.topics, name), f"Topics has no {name}"


# ---- shell -----------------------------------------------------------------------------------

def run_env_overrides(block: Block, request: pytest.FixtureRequest) -> None:
    """configuration.md's two override commands, each started, checked and stopped."""
    tmp_path: Path = request.getfixturevalue("tmp_path")
    bin_dir = shim_bin(tmp_path / "bin")
    first, second = commands(block.text)
    port = free_port()
    proc = subprocess.Popen(["bash", "-c", first.replace("9000", str(port))], cwd=tmp_path,
                            env=shell_env(bin_dir, STATE_DIRECTORY=str(tmp_path / "first")),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_until(lambda: listening(port), 60, "EDGEFLEET_SERVER__PORT")
        key = re.search(r"API_KEY=(\S+)", first).group(1)  # type: ignore[union-attr]
        assert get(f"http://127.0.0.1:{port}/v1/models")[0] == 401
        assert get(f"http://127.0.0.1:{port}/v1/models", {"Authorization": f"Bearer {key}"})[0] == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stdout.read() if proc.stdout else ""
    state = re.search(r"STATE_DIR=(\S+)", second).group(1)  # type: ignore[union-attr]
    port = free_port()
    proc = subprocess.Popen(["bash", "-c", second.replace(state, str(tmp_path / "data"))], cwd=tmp_path,
                            env=shell_env(bin_dir, EDGEFLEET_SERVER__PORT=str(port),
                                          EDGEFLEET_SERVER__GRPC_PORT=str(free_port())),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_until(lambda: ready(f"http://127.0.0.1:{port}"), 120, "serve --demo in EDGEFLEET_STATE_DIR")
        assert (tmp_path / "data" / "models" / EMBED / "current").is_symlink()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stdout.read() if proc.stdout else ""


def run_for_real(block: Block, request: pytest.FixtureRequest) -> None:
    """The README's "Running it for real" commands, with its config file in a temporary place."""
    tmp_path: Path = request.getfixturevalue("tmp_path")
    bin_dir = shim_bin(tmp_path / "bin")
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[server]\nport = {port}\n')
    serve_line, *others = commands(block.text)
    proc = subprocess.Popen(["bash", "-c", serve_line.replace("/etc/edgefleet/agent.toml", str(config))],
                            cwd=tmp_path, env=shell_env(bin_dir), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: ready(f"http://127.0.0.1:{port}"), 60, "serve --config")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
    for command in others:  # "# or EDGEFLEET_CONFIG=...": the rest read the same file that way
        done = sh(command, tmp_path, shell_env(bin_dir, EDGEFLEET_CONFIG=str(config)))
        assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
    assert (tmp_path / "state" / "models" / CHAT / "current").is_symlink()  # demo build put it there


# ---- operations.md: the signed-update walkthrough, in the page's order -----------------------

@dataclass
class Walkthrough:
    outcomes: dict[str, str | None]  # a block's first line -> None (ran) or what went wrong
    doorbell: dict[str, Any] | None = None


def reports(watcher: Watcher) -> list[dict[str, Any]]:
    """press-7's update reports so far, as `hub status --follow` reads them."""
    return [json.loads(m.payload) for m in watcher.on("edgefleet/v1/devices/press-7/update")]


def _substitute(command: str, hub: Path, hub_port: int, broker: MosquittoBroker) -> str:
    command = command.replace("/srv/edgefleet-hub", str(hub)).replace("--hub …", f"--hub {hub}")
    command = command.replace("--port 8000", f"--port {hub_port}")
    return command.replace("broker.example.net", f"127.0.0.1:{broker.port}")


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walkthrough]:
    work = tmp_path_factory.mktemp("walkthrough")
    bin_dir = shim_bin(work / "bin")
    hub = work / "srv-edgefleet-hub"
    hub_port, agent_port = free_port(), free_port()
    broker = MosquittoBroker(work)
    broker.start()
    # the operator's shell, as the page says: the broker given once for the `hub` commands that
    # leave --mqtt out (and set while the agent and doctor run too: it must not disturb them)
    env = shell_env(bin_dir, EDGEFLEET_HUB_MQTT=f"127.0.0.1:{broker.port}")
    page = [b for b in BLOCKS if b.page == "docs/operations.md"]
    steps = [b for b in page if how(b) is walkthrough_step]  # not the blocks with a runner of their own
    walk = Walkthrough({b.first: "not reached: an earlier step failed" for b in steps})
    background: list[subprocess.Popen[str]] = []
    state = work / "state"
    build_demo_bundles(state / "models")
    config = work / "agent.toml"
    trust_root = work / "etc-edgefleet-root.json"

    def run_block(block: Block) -> None:
        if block.lang == "toml":
            provision(block)
            return
        for written in commands(block.text):
            command = _substitute(written, hub, hub_port, broker)
            if "hub rotate-key" in command and "--revoke" in command:
                prefix = re.search(r"--revoke (\S+)", command).group(1)  # type: ignore[union-attr]
                from sync.hub.repository import HubRepository

                command = command.replace(prefix, HubRepository(hub).root().roles["root"].keyids[0][:6])
            if "hub serve" in command:
                background.append(subprocess.Popen(["bash", "-c", command], cwd=work, env=env, text=True,
                                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                   start_new_session=True))
                wait_until(lambda: listening(hub_port), 30, "hub serve")
                continue
            if "--follow" in command:
                continue  # started before the publish, below: it watches the rollout as it happens
            done = sh(command, work, env)
            assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
            with (work / "commands.log").open("a") as log:
                log.write(f"$ {command}\n{done.stdout}{done.stderr}")
            if "hub status" in command and "--json" in command:
                rows = {row["device"]: row for row in json.loads(done.stdout)}
                assert rows["press-7"]["online"] is True, rows

    def provision(block: Block) -> None:
        """The page's device config, with the broker's and the hub's addresses of this machine
        (the URL's path as the page has it), then `doctor` and the agent on it."""
        shutil.copyfile(hub / "trust-root.json", trust_root)
        data = tomllib.loads(block.text)
        url = urlparse(data["updates"]["hub_url"])
        hub_url = url._replace(scheme="http", netloc=f"127.0.0.1:{hub_port}").geturl()
        text = (block.text.replace(data["updates"]["hub_url"], hub_url)
                .replace(data["updates"]["trust_root"], str(trust_root))
                .replace(f'host = "{data["mqtt"]["host"]}"',
                         f'host = "127.0.0.1"\nport = {broker.port}\ndevice_id = "press-7"'))
        config.write_text(f'state_dir = "{state}"\n[server]\nport = {agent_port}\n{text}')
        done = sh(f"edgefleet doctor --config {config}", work, env)
        assert f"[ok  ] updates: hub {hub_url}: metadata verified" in done.stdout, done.stdout
        assert "[ok  ] mqtt: connected to" in done.stdout, done.stdout
        with (work / "agent.log").open("w") as log:
            background.append(subprocess.Popen(["bash", "-c", f"edgefleet serve --config {config}"], cwd=work,
                                               env=env, text=True, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))
        wait_until(lambda: ready(f"http://127.0.0.1:{agent_port}"), 120, "the provisioned agent")

    watcher = Watcher(broker, "edgefleet/v1/#")
    try:
        with watcher:
            for block in steps:
                if block.first.startswith("edgefleet hub publish"):
                    source = (state / "models" / EMBED / "current").resolve()
                    for name in re.findall(r"=\./(\S+)", block.text):
                        make_release(source, work / name, f"int8-1.0.0-{name}", onnx_note=name)
                    follow = next(c for b in steps for c in commands(b.text) if "--follow" in c)
                    watching = subprocess.Popen(["bash", "-c", _substitute(follow, hub, hub_port, broker)],
                                                cwd=work, env=env, text=True, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT)
                    time.sleep(1.0)  # subscribed before the doorbell rings
                try:
                    run_block(block)
                    if block.first.startswith("edgefleet hub publish"):
                        output, _ = watching.communicate(timeout=180)
                        assert watching.returncode == 0 and "-> active" in output, f"no rollout:\n{output}"
                        bells = watcher.on("edgefleet/v1/groups/shop-floor/desired")
                        walk.doorbell = json.loads(bells[-1].payload) if bells else None
                        # the canary for press-7 too, before anything is stopped
                        try:
                            wait_until(lambda: any(r.get("version") == "int8-1.0.0-canary-build"
                                                   and r.get("state") == "active" for r in reports(watcher)),
                                       120, "the canary active on press-7")
                        except AssertionError as exc:
                            raise AssertionError(f"{exc}; reports: {reports(watcher)}; the agent's log: "
                                                 f"{(work / 'agent.log').read_text()[-3000:]}") from None
                except Exception as exc:  # noqa: BLE001 - recorded for this block's own test
                    walk.outcomes[block.first] = f"{type(exc).__name__}: {exc}"
                    break
                walk.outcomes[block.first] = None
            else:  # after rotating root: the device's trust root is the old one, and still verifies
                done = sh(f"edgefleet doctor --config {config}", work, env)
                if "metadata verified" not in done.stdout:
                    walk.outcomes[steps[-1].first] = f"after the rotation the old trust root fails:\n{done.stdout}"
            yield walk
    finally:
        for proc in reversed(background):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        broker.stop()


def walkthrough_step(block: Block, request: pytest.FixtureRequest) -> None:
    walk: Walkthrough = request.getfixturevalue("walkthrough")
    outcome = walk.outcomes[block.first]
    assert outcome is None, outcome


def check_prometheus_config(block: Block, request: pytest.FixtureRequest) -> None:
    """operations.md's prometheus.yml, with the shipped rules file, through `promtool check config`."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt install prometheus)")
    tmp = request.getfixturevalue("tmp_path")
    rules = REPO / "packaging" / "prometheus" / "edgefleet-rules.yml"
    (tmp / "prometheus.yml").write_text(block.text.replace("/etc/prometheus/edgefleet-rules.yml", str(rules)))
    checked = subprocess.run([promtool, "check", "config", str(tmp / "prometheus.yml")], capture_output=True,
                             text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# ---- operations.md: webhooks ------------------------------------------------------------------

def check_webhooks_toml(block: Block, request: pytest.FixtureRequest) -> None:
    """The example webhooks.toml, with its key files made as the page says, loads."""
    from sync.hub.webhooks.config import load_endpoints

    hub: Path = request.getfixturevalue("tmp_path")
    (hub / "webhooks.toml").write_text(block.text)
    for name in re.findall(r'secret_file = "([^"]+)"', block.text):
        (hub / name).write_text(os.urandom(32).hex() + "\n")
        (hub / name).chmod(0o600)
    assert [e.name for e in load_endpoints(hub)] == re.findall(r'^name = "([^"]+)"', block.text, re.M)


def check_webhook_body(block: Block, request: pytest.FixtureRequest) -> None:
    """The example body is what the hub makes of its `data` (the Last Will shown)."""
    from sync.hub.webhooks.events import derive

    shown = parse_json(block.text)
    (event,) = derive("edgefleet/v1", shown["topic"], json.dumps(shown["data"]).encode(), "online", False,
                      shown["at"]).events
    assert json.loads(event.body) | {"id": shown["id"]} == shown


def check_webhook_verifier(block: Block, request: pytest.FixtureRequest) -> None:
    """The receiver's snippet accepts a body the hub signed, and refuses it tampered, stale or
    signed with another key."""
    from sync.hub.webhooks.signing import headers

    namespace: dict[str, Any] = {}
    exec(block.text, namespace)  # the page's own code, as a reader pastes it
    verify = namespace["verify"]
    key, body = os.urandom(32), b'{"schema": "edgefleet.webhook/1", "event": "device.offline"}'
    signed = headers(key, "device.offline", "6bba0e568f6b48a79d2592dcb9b5bfc3", body)
    assert verify(key, signed, body)
    assert not verify(key, signed, body.replace(b"offline", b"online"))
    assert not verify(os.urandom(32), signed, body)
    assert not verify(key, headers(key, "device.offline", "x", body, now=time.time() - 600), body)


# ---- which block runs how --------------------------------------------------------------------

Runner = Callable[[Block, pytest.FixtureRequest], None]
SLOW = {walkthrough_step, check_doorbell, run_env_overrides, run_for_real}

PODMAN = ("root, debootstrap, buildah and podman, and Debian's mirror; tests/test_container_image.py builds the "
          "image and runs it as written")

#: (page, how the block's first line starts) -> its runner, or the reason it cannot run here.
HOW: dict[tuple[str, str], Runner | str] = {
    # README
    ("README.md", "scripts/setup.sh && .venv/bin/edgefleet serve --demo"):
        "sets up the machine (pip, compiles llama.cpp); `serve --demo` itself is run by "
        "tests/test_cli.py::test_serve_demo_answers_curl_and_stops_cleanly_on_sigterm",
    ("README.md", "scripts/setup.sh --test && .venv/bin/python -m pytest"): "that is this test suite",
    ("README.md", "scripts/setup.sh && scripts/demo-updates.sh"): "run as written by tests/test_readme_updates.py",
    ("README.md", "# which models are serving"): "run command by command by tests/test_readme_tour.py",
    ("README.md", "from openai import OpenAI"): run_python,
    ("README.md", "edgefleet serve --config /etc/edgefleet/agent.toml"): run_for_real,
    ("README.md", "[server]"): check_agent_config,
    ("README.md", "sudo packaging/build-image.sh"): PODMAN,
    ("README.md", "agent/"): check_repo_layout,
    # api.md
    ("docs/api.md", '{"error": {"message": "temperature'): check_json_error_example,
    ("docs/api.md", '{"object": "list", "data": [{"id"'): check_json_against("/v1/models", None),
    ("docs/api.md", '{"id": "chatcmpl-'): check_json_against("/v1/chat/completions", {
        "model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
    ("docs/api.md", '{"object": "list", "model": "all-minilm-l6-v2"'): check_json_against(
        "/v1/embeddings", {"model": EMBED, "input": "a cat"}),
    ("docs/api.md", '{"model_name": "all-minilm-l6-v2"'): check_infer_example,
    ("docs/api.md", "import numpy as np"): run_python,
    ("docs/api.md", "import grpc"): run_python,
    # configuration.md
    ("docs/configuration.md", "edgefleet: config error:"): check_config_error_line,
    ("docs/configuration.md", 'state_dir = "/var/lib/edgefleet"'): check_keys_reference,
    ("docs/configuration.md", "[mqtt]"): check_agent_config,
    ("docs/configuration.md", "[telemetry]"): check_agent_config,
    ("docs/configuration.md", "[alerts]"): check_agent_config,
    ("docs/configuration.md", "[audit]"): check_agent_config,
    ("docs/configuration.md", "[[models]]"): check_agent_config,
    ("docs/configuration.md", "[updates]"): check_agent_config,
    ("docs/configuration.md", "# TLS and mTLS on the HTTP and gRPC ports"): check_agent_config,
    ("docs/configuration.md", "EDGEFLEET_SERVER__PORT=9000"): run_env_overrides,
    ("docs/configuration.md", "<state_dir>/"): check_state_dir_layout,
    ("docs/configuration.md", "[probe]"): check_manifest,
    ("docs/configuration.md", "/var/lib/edgefleet/models/"): check_models_tree,
    ("docs/configuration.md", 'format = "gguf"'): check_manifest,
    # operations.md
    ("docs/operations.md", "apt install ./edgefleet_0.1.0_amd64.deb"):
        "apt and a built .deb; tests/test_service_unit_and_deb.py installs the package into a throwaway root",
    ("docs/operations.md", "sudo -u edgefleet edgefleet doctor"):
        "needs the package's edgefleet user; doctor itself runs in tests/test_doctor_checks.py",
    ("docs/operations.md", "systemctl start edgefleet"): "systemd is not running here; "
        "tests/test_service_lifecycle.py plays systemd's side (notify socket, signals)",
    ("docs/operations.md", "journalctl -u edgefleet -f"): "systemd's journal is not running here",
    ("docs/operations.md", "# import a GGUF and chat with it"): "a .gguf of the reader's and the systemd "
        "service; tests/test_models_cli.py imports the demo GGUF into a running agent and chats with it",
    ("docs/operations.md", "systemctl reload edgefleet"): "systemd is not running here; SIGHUP reloads are "
        "run by tests/test_service_lifecycle.py",
    ("docs/operations.md", "apt install ./edgefleet_0.2.0_amd64.deb"): "apt and a newer .deb",
    ("docs/operations.md", "apt remove edgefleet"): "apt; tests/test_service_unit_and_deb.py runs remove and purge "
        "in a throwaway root",
    ("docs/operations.md", "install -D -m 0644 /usr/share/edgefleet/systemd/gpu-nvidia.conf"):
        "systemd and an NVIDIA GPU",
    ("docs/operations.md", "packaging/build-deb.sh"): "builds the package (minutes); "
        "tests/test_service_unit_and_deb.py builds it",
    ("docs/operations.md", "apt install gcc-aarch64-linux-gnu"): "a cross toolchain and a 40-minute compile; "
        "EDGEFLEET_TEST_ARM64=1 tests/test_arm64_package.py",
    ("docs/operations.md", "packaging/smoke-arm64.sh"): "qemu and debootstrap; "
        "EDGEFLEET_TEST_ARM64=1 tests/test_arm64_package.py",
    ("docs/operations.md", "edgefleet hub"): walkthrough_step,
    ("docs/operations.md", "edgefleet hub view --mqtt"): "a long-running server; tests/test_fleet_view.py runs "
        "`hub view` against a real mosquitto and drives the page in chromium",
    ("docs/operations.md", "# a staged rollout"): "a controller, a hub and a fleet that takes minutes; "
        "tests/test_rollout.py runs `hub control`, `hub rollout start|status|pause|resume|abort` with real agents",
    ("docs/operations.md", "sudo apt install debootstrap buildah podman"): PODMAN,
    ("docs/operations.md", "services:"): "Docker Compose is not installed here; tests/test_container_image.py runs "
        "the image with the same volume, read-only root, tmpfs and stop timeout through podman",
    ("docs/operations.md", "apiVersion: apps/v1"): "no Kubernetes here; tests/test_container_image.py checks the "
        "image's user (10001), volume and /readyz, /healthz that this Deployment relies on",
    ("docs/operations.md", "[mqtt]"): walkthrough_step,
    ("docs/operations.md", "# turn TLS on (the key readable"): "the package's edgefleet user, /etc and systemd; "
        "tests/test_tls.py runs the agent with TLS, mTLS, doctor and a SIGHUP rotation",
    ("docs/operations.md", "# /etc/mosquitto/conf.d/edgefleet-bridge.conf"):
        "run as the site broker's config by tests/test_mqtt_bridge.py",
    ("docs/operations.md", "# prometheus.yml"): check_prometheus_config,
    ("docs/operations.md", "# API keys: one app may chat"): "the package's edgefleet user (sudo -u); "
        "tests/test_api_keys.py runs `keys add|list|revoke|rotate` (with --state-dir / --config) against a real agent",
    ("docs/operations.md", "# webhooks: check the configuration"): "a long-running process and a receiver; "
        "tests/test_webhooks.py runs `hub webhooks` and `--check` with a real broker and receiver",
    ("docs/operations.md", "# /srv/edgefleet-hub/webhooks.toml"): check_webhooks_toml,
    ("docs/operations.md", '{"schema": "edgefleet.webhook/1"'): check_webhook_body,
    ("docs/operations.md", "import hashlib"): check_webhook_verifier,
    # the other pages
    ("docs/architecture.md", ""): "a diagram",
    ("docs/security.md", '{"schema": "edgefleet.desired/1"'): check_desired_state,
    ("docs/security.md", "# /etc/mosquitto/conf.d/edgefleet-tls.conf"): "a system mosquitto and /etc; "
        "tests/test_broker_identity.py runs this listener (TLS, require_certificate, CRL, ACL) on loopback",
    ("docs/security.md", "# /etc/mosquitto/edgefleet.acl"): "run as the broker's ACL by tests/test_broker_identity.py",
    ("docs/security.md", "$ edgefleet audit verify"): "output of a real log; tests/test_audit_log.py runs `audit "
        "verify` on real logs and their edits and checks these lines",
    ("docs/mqtt.md", '{"schema": "edgefleet.doorbell/1"'): check_doorbell,
    ("docs/mqtt.md", "link = app[MQTT]"): check_link_sketch,
}


def how(block: Block) -> Runner | str | None:
    matches = [(prefix, runner) for (page, prefix), runner in HOW.items()
               if page == block.page and block.first.startswith(prefix)]
    if not matches:
        if block.lang == "json":
            return lambda b, r: parse_json(b.text)
        if block.lang == "toml":
            return lambda b, r: tomllib.loads(b.text)
        return None
    return max(matches, key=lambda match: len(match[0]))[1]  # the most specific


def _param(block: Block) -> Any:
    runner = how(block)
    marks = [pytest.mark.slow] if runner in SLOW else []
    return pytest.param(block, id=block.id, marks=marks)


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_doc_block(block: Block, request: pytest.FixtureRequest) -> None:
    runner = how(block)
    if runner is None:
        pytest.fail(f"{block.id} ({block.first!r}): no runner and no reason it cannot run; add it to HOW")
    if isinstance(runner, str):
        pytest.skip(f"{block.id}: {runner}")
    runner(block, request)


def test_every_runner_has_its_block() -> None:
    """A runner whose block was removed or reworded is noticed, not silently kept."""
    for page, prefix in HOW:
        assert any(b.page == page and b.first.startswith(prefix) for b in BLOCKS), (page, prefix)


# ---- the docs the package ships, and their links ---------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_the_package_ships_every_page_and_every_link_between_them_resolves(tmp_path: Path) -> None:
    done = subprocess.run([str(REPO / "packaging/install-docs.sh"), str(REPO), str(tmp_path)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert '"$here/install-docs.sh"' in (REPO / "packaging/build-deb.sh").read_text()  # the build runs it
    shipped = tmp_path / "usr/share/doc/edgefleet"
    assert sorted(p.name for p in shipped.glob("*.md")) == sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert sorted(p.name for p in (shipped / "img").glob("*.png")) == sorted(
        p.name for p in (REPO / "docs/img").glob("*.png"))  # the screenshots the pages show
    for page in shipped.glob("*.md"):
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"\w+://", target):
                continue
            file, _, anchor = target.partition("#")
            linked = shipped / file if file else page
            assert linked.is_file(), f"{page.name}: dead link {target}"
            if anchor:
                anchors = {slug(m) for m in re.findall(r"^#+ (.*)$", linked.read_text(), re.M)}
                assert anchor in anchors, f"{page.name}: {target}: no such heading in {linked.name}"


def test_blocks_are_found() -> None:
    """The parser sees the pages' blocks (a change of fence style would silently empty the tests)."""
    assert len(BLOCKS) > 40
    assert {"python", "sh", "toml", "json"} <= {b.lang for b in BLOCKS}
