"""The container image from packaging/build-image.sh, run with podman as an operator runs it.

The module builds the image once (about 2 minutes on 2 cores: the .deb, a debootstrapped
bookworm root, apt) or loads the archive named by $EDGEFLEET_IMAGE_ARCHIVE, then checks:
what the image is (non-root, a state volume, a health check, no compilers or docs); a chat
and an embedding through a published port from the demo models imported into a state
volume; the same volume in a new container with a read-only root still serving them, and
SIGTERM draining an endless stream there and exiting 0 within the drain timeout; a bad
config and an unusable state volume ending the container at once, with a non-zero code
and the one-line reason in its log.

Skipped with the reason in the test report where podman is missing or cannot run a
container here. Nested VMs often need runtime flags: `_podman_flags` tries them on a
one-binary image made from this host's `true`, so no registry is involved. Building also
needs root, buildah and debootstrap, and Debian's mirror.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import re
import resource
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import CHAT, EMBED, free_port

REPO = Path(__file__).resolve().parent.parent
PODMAN = shutil.which("podman")
STATE = "/var/lib/edgefleet"
UID = 10001
API_KEY = "container-test-key"
DRAIN_S = 4.0
EOS = 2  # banned so that a stream could only end at max_tokens, far past the drain deadline
ENDLESS = {"model": CHAT, "prompt": "Write a long story about the sea.", "max_tokens": 1800,
           "temperature": 0.8, "logit_bias": {str(EOS): -100}, "stream": True}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(PODMAN is None, reason="podman is not installed (apt install podman buildah "
                                 "debootstrap): the container image is not tested here")]


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([PODMAN or "podman", *args], capture_output=True, text=True, check=False,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {result.returncode}: {result.stderr[-2000:]}")
    return result


# --- can podman run a container here, and with which flags? -----------------------------

def _probe_image() -> str:
    """A one-binary image of this host's `true` (and its libraries), imported from a tar."""
    binary = Path(shutil.which("true") or "/bin/true").resolve()
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False).stdout
    files = {"/bin/true": binary}
    for path in re.findall(r"(/\S+) \(0x", ldd):
        files[path] = Path(path).resolve()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, real in files.items():
            tar.add(str(real), arcname=name.lstrip("/"))
    tag = "localhost/edgefleet-probe:test"
    subprocess.run([PODMAN or "podman", "import", "-", tag], input=archive.getvalue(), capture_output=True,
                   check=True, timeout=60)
    return tag


def _limits() -> list[str]:
    """Limits no higher than this process's: where podman may not raise them (no
    CAP_SYS_RESOURCE, as in some VMs) its defaults (nofile 1048576) make the runtime fail."""
    flags = []
    for name, rlimit, cap in (("nofile", resource.RLIMIT_NOFILE, 1 << 20), ("nproc", resource.RLIMIT_NPROC, 32768)):
        hard = resource.getrlimit(rlimit)[1]
        value = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
        flags += ["--ulimit", f"{name}={value}:{value}"]
    return flags


@pytest.fixture(scope="module")
def flags() -> list[str]:
    """The `podman run` flags this machine needs: none on an ordinary host; lower limits and
    runc (crun refuses hybrid cgroup v1/v2 hierarchies) in some VMs. Skip if none work."""
    try:
        probe = _probe_image()
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"podman cannot import an image here: {exc}")
    tried = []
    try:
        for extra in ([], _limits(), ["--runtime", "runc"], ["--runtime", "runc", *_limits()],
                      ["--cgroups=disabled", *_limits()]):
            result = podman("run", "--rm", *extra, probe, "/bin/true", check=False, timeout=60)
            if result.returncode == 0:
                print(f"podman run flags this machine needs: {' '.join(extra) or 'none'}")
                return extra
            error = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
            tried.append(f"{' '.join(extra) or 'no flags'}: {error}")
    finally:
        podman("rmi", "-f", probe, check=False)
    pytest.skip("podman cannot run a container on this machine; tried " + " | ".join(tried))


# --- the image --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image(flags: list[str], tmp_path_factory: pytest.TempPathFactory,
          request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """{"tag", "oci" (the OCI archive, when built here)}: loaded from $EDGEFLEET_IMAGE_ARCHIVE,
    else built by packaging/build-image.sh and removed afterwards."""
    archive = os.environ.get("EDGEFLEET_IMAGE_ARCHIVE")
    if archive:
        loaded = podman("load", "-i", archive, timeout=600).stdout
        yield {"tag": re.findall(r"Loaded image(?:\(s\))?: (\S+)", loaded)[-1], "oci": None}
        return
    if os.geteuid() != 0:
        pytest.skip("building the image needs root (debootstrap, chroot); or set EDGEFLEET_IMAGE_ARCHIVE "
                    "to an archive packaging/build-image.sh made")
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building the image needs {' and '.join(missing)} (apt install buildah debootstrap)")
    out = tmp_path_factory.mktemp("image")
    tag = f"localhost/edgefleet-test:{os.getpid()}"
    started = time.monotonic()
    deb: Path = request.getfixturevalue("deb_package")  # the suite's one .deb build, shared
    result = subprocess.run([str(REPO / "packaging/build-image.sh"), "--deb", str(deb), "--out", str(out),
                             "--tag", tag],
                            capture_output=True, text=True, check=False, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    print(f"build-image.sh: {time.monotonic() - started:.0f}s\n{result.stderr[-1500:]}")
    try:
        yield {"tag": tag, "oci": Path(result.stdout.strip().splitlines()[-1])}
    finally:
        podman("rmi", "-f", tag, check=False)


@pytest.fixture(scope="module")
def state_volume(image: dict[str, Any], flags: list[str], state_dir: Path) -> Iterator[str]:
    """A named volume with the demo bundles imported as an operator would: a tar of a state
    dir unpacked by the image's own tar, as the image's user (so the files are its own)."""
    name = f"edgefleet-test-state-{os.getpid()}"
    podman("volume", "create", name)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for part in ("models", "store", "state.json"):
            if (state_dir / part).exists():
                tar.add(str(state_dir / part), arcname=part)
    subprocess.run([PODMAN or "podman", "run", "--rm", "-i", *flags, "-v", f"{name}:{STATE}", "--entrypoint", "tar",
                    image["tag"], "-x", "-C", STATE], input=archive.getvalue(), capture_output=True, check=True,
                   timeout=120)
    try:
        yield name
    finally:
        podman("volume", "rm", "-f", name, check=False)


class Container:
    """One `podman run -d` of the image, reached on a published loopback port."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        return logs(self.name)

    def state(self) -> dict[str, Any]:
        return json.loads(podman("inspect", self.name, "--format", "{{json .State}}").stdout)

    async def wait_ready(self, http: aiohttp.ClientSession, models: int, timeout: float = 240) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.state()["Running"]:
                raise AssertionError(f"the container exited: {self.state()}\n{self.log()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(self.url + "/readyz") as resp:
                    body = await resp.json()
                    if resp.status == 200 and len(body["models"]) == models:
                        return body
            await asyncio.sleep(0.5)
        raise AssertionError(f"not ready in {timeout}s:\n{self.log()}")


@contextlib.contextmanager
def running(image: dict[str, Any], flags: list[str], *args: str) -> Iterator[Container]:
    name = f"edgefleet-test-{os.getpid()}-{free_port()}"
    port = free_port()
    podman("run", "-d", "--replace", "--name", name, *flags, "-p", f"127.0.0.1:{port}:8080", *args, image["tag"])
    try:
        yield Container(name, port)
    finally:
        podman("rm", "-f", "-v", "-t", "0", name, check=False)


def logs(name: str) -> str:
    """What the container wrote (the agent logs to stderr; the runtime keeps both streams)."""
    result = podman("logs", name, check=False)
    return result.stdout + result.stderr


def exited(image: dict[str, Any], flags: list[str], *args: str) -> tuple[int, str]:
    """Run the image to its end: (exit code, its log)."""
    name = f"edgefleet-test-{os.getpid()}-{free_port()}"
    try:
        result = podman("run", "--name", name, *flags, *args, image["tag"], check=False, timeout=120)
        return result.returncode, logs(name)
    finally:
        podman("rm", "-f", "-v", name, check=False)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o644)  # the file stays the host's; the container's user reads it as "other"
    return path


async def _chat_and_embedding(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
    async with http.post(url + "/v1/chat/completions", headers=headers, json={
            "model": CHAT, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 12}) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    assert body["choices"][0]["message"]["content"].strip() and body["usage"]["completion_tokens"] > 0
    async with http.post(url + "/v1/embeddings", headers=headers,
                         json={"model": EMBED, "input": ["a cat sat on the mat", "a kitten on a rug",
                                                         "quarterly bond yields"]}) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    cat, kitten, bonds = (row["embedding"] for row in body["data"])
    assert len(cat) == 384 and math.isclose(_dot(cat, cat), 1.0, rel_tol=1e-3)
    assert _dot(cat, kitten) > _dot(cat, bonds)


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


# --- the tests --------------------------------------------------------------------------

def test_image_runs_as_a_non_root_user_with_a_state_volume_health_check_and_nothing_to_build_with(
        image: dict[str, Any], flags: list[str]) -> None:
    config = json.loads(podman("image", "inspect", image["tag"], "--format", "{{json .Config}}").stdout)
    assert config["User"] == f"{UID}:{UID}"
    assert STATE in config["Volumes"] and "8080/tcp" in config["ExposedPorts"]
    assert config["Entrypoint"] == ["/usr/bin/edgefleet"] and config["Cmd"] == ["serve"]
    assert config["StopSignal"] in ("SIGTERM", "15")
    health = json.loads(podman("image", "inspect", image["tag"], "--format", "{{json .HealthCheck}}").stdout)
    assert health and health["Test"][-1].endswith("healthcheck.py"), health
    size = int(podman("image", "inspect", image["tag"], "--format", "{{.Size}}").stdout)
    print(f"image: {size / 1e6:.0f} MB unpacked")
    assert size < 600e6, f"{size / 1e6:.0f} MB"

    # installed by dpkg (so apt put it there), no compilers, no pip, no docs but licences
    inside = podman("run", "--rm", *flags, "--entrypoint", "/bin/sh", image["tag"], "-c",
                    "dpkg-query -W -f '${Package} ${Version} ${Status}\\n' edgefleet; id -u; "
                    "for t in gcc cc c++ make pip pip3; do command -v $t; done; "
                    "find /opt/edgefleet -type d -name pip; "
                    "find /usr/share/doc /usr/share/man -type f ! -name copyright ! -path '/usr/share/doc/edgefleet/*'"
                    ).stdout.splitlines()
    assert inside == ["edgefleet 0.1.0 install ok installed", str(UID)], inside

    if image["oci"] is not None:  # the OCI archive: an index naming the image, its config as above
        with tarfile.open(image["oci"]) as tar:
            index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
            digest = index["manifests"][0]["digest"].split(":")[1]
            manifest = json.load(tar.extractfile(f"blobs/sha256/{digest}"))  # type: ignore[arg-type]
            blob = tar.extractfile(f"blobs/sha256/{manifest['config']['digest'].split(':')[1]}")
            oci_config = json.load(blob)["config"]  # type: ignore[arg-type]
        assert oci_config["User"] == f"{UID}:{UID}" and STATE in oci_config["Volumes"]
        print(f"{image['oci'].name}: {image['oci'].stat().st_size / 1e6:.0f} MB")


async def test_imported_models_answer_a_chat_and_an_embedding_on_the_published_port(
        image: dict[str, Any], flags: list[str], state_volume: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.toml", f"""
state_dir = "{STATE}"
[server]
api_key = "{API_KEY}"
[[models]]
name = "{CHAT}"
[[models]]
name = "{EMBED}"
""")
    with running(image, flags, "-v", f"{state_volume}:{STATE}", "-v", f"{config}:/etc/edgefleet/agent.toml:ro"
                 ) as agent:
        async with aiohttp.ClientSession() as http:
            ready = await agent.wait_ready(http, models=2)
            assert {m["name"]: m["state"] for m in ready["models"]} == {CHAT: "ready", EMBED: "ready"}
            async with http.get(agent.url + "/v1/models") as resp:
                assert resp.status == 401  # the mounted config's API key holds
            await _chat_and_embedding(http, agent.url, {"Authorization": f"Bearer {API_KEY}"})
        health = podman("healthcheck", "run", agent.name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr
        log = agent.log()
    lines = [line for line in log.splitlines() if re.match(r"time=\d", line)]  # the agent's, not podman's
    assert any("listening on http://0.0.0.0:8080" in line for line in lines), log
    assert all(re.match(r"time=\S+ level=\w+ logger=\S+ msg=", line) for line in lines)
    assert "Traceback" not in log


async def test_same_volume_in_a_read_only_container_still_serves_and_sigterm_drains_within_the_timeout(
        image: dict[str, Any], flags: list[str], state_volume: str) -> None:
    # no config file: the environment names the models; the image's root is read-only
    env = ["-e", f'EDGEFLEET_MODELS=[{{name = "{CHAT}"}}, {{name = "{EMBED}"}}]',
           "-e", f"EDGEFLEET_SERVER__DRAIN_TIMEOUT_S={DRAIN_S}"]
    with running(image, flags, "--read-only", "--tmpfs", "/tmp", "-v", f"{state_volume}:{STATE}", *env) as agent:
        async with aiohttp.ClientSession() as http:
            ready = await agent.wait_ready(http, models=2)
            assert {m["name"] for m in ready["models"] if m["state"] == "ready"} == {CHAT, EMBED}
            await _chat_and_embedding(http, agent.url, {})

            stream = await http.post(agent.url + "/v1/completions", json=ENDLESS)
            assert stream.status == 200
            first = await stream.content.readline()
            assert first.startswith(b"data: {")
            started = time.monotonic()
            stop = asyncio.ensure_future(asyncio.to_thread(podman, "stop", "-t", str(int(DRAIN_S) + 30), agent.name))
            rest = await asyncio.wait_for(stream.content.read(), DRAIN_S + 20)
            stream.release()
            await stop
            took = time.monotonic() - started
        events = [line for line in (first + rest).decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: "):])["choices"][0]["finish_reason"] == "shutdown"
        state = agent.state()
        log = agent.log()
    print(f"podman stop: {took:.1f}s with a {DRAIN_S}s drain")
    assert state["ExitCode"] == 0, log  # it ended itself: podman's SIGKILL would give 137
    assert took < DRAIN_S + 20, f"{took:.1f}s"
    assert "shutting down: finishing 1 admitted request(s)" in log and "msg=stopped" in log, log
    assert "Traceback" not in log and "Read-only file system" not in log


def test_bad_config_file_ends_the_container_with_the_reason_in_one_line(
        image: dict[str, Any], flags: list[str], tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.toml", '[server]\nport = "80a"\n')
    code, log = exited(image, flags, "-v", f"{config}:/etc/edgefleet/agent.toml:ro")
    assert code == 2, log
    assert log.strip().splitlines()[-1] == ("edgefleet: config error: /etc/edgefleet/agent.toml + environment: "
                                            "server.port: expected an integer, got '80a'"), log
    assert "Traceback" not in log


@pytest.mark.parametrize("kind", ["read-only volume", "volume owned by another user"])
def test_unusable_state_volume_ends_the_container_naming_the_path(
        image: dict[str, Any], flags: list[str], tmp_path: Path, kind: str) -> None:
    if kind == "read-only volume":
        volume = f"edgefleet-test-ro-{os.getpid()}"
        podman("volume", "create", volume)
        mount, missing = f"{volume}:{STATE}:ro", "write"
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a directory to another user needs root")
        volume = ""
        foreign = tmp_path / "state"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 4242, 4242)
        mount, missing = f"{foreign}:{STATE}", "read, write, enter (x)"
    try:
        code, log = exited(image, flags, "-v", mount)
    finally:
        if volume:
            podman("volume", "rm", "-f", volume, check=False)
    assert code == 1, log
    last = log.strip().splitlines()[-1]
    assert last.startswith(f"edgefleet: state dir {STATE}: user edgefleet (uid {UID}) has no {missing} permission"), log
    assert "Traceback" not in log
