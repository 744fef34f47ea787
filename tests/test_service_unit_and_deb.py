"""The systemd unit and the .deb, checked with the tools an operator's machine uses:
systemd-analyze, systemd-tmpfiles, dpkg-deb and dpkg itself (into a throwaway root)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CHAT, EMBED, free_port
from service_process import ServiceProcess, deny_write_execute, kernel_has_mdwe, write_config

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "edgefleet.service"
EDGEFLEET_BIN = Path(sys.executable).parent / "edgefleet"

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is not installed")


def _unit_for_this_checkout(directory: Path) -> Path:
    """The unit with ExecStart= pointing at this checkout's edgefleet (verify checks it exists)."""
    directory.mkdir(parents=True, exist_ok=True)
    unit = directory / "edgefleet.service"
    unit.write_text(UNIT.read_text().replace("/opt/edgefleet/venv/bin/edgefleet", str(EDGEFLEET_BIN)))
    return unit


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_unit_and_its_gpu_drop_ins(tmp_path: Path) -> None:
    unit = _unit_for_this_checkout(tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    for drop_in in ("gpu-nvidia.conf", "gpu-rocm.conf"):
        d = tmp_path / "edgefleet.service.d"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        shutil.copy(REPO / "systemd" / drop_in, d / "gpu.conf")
        result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                                check=False, env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"})
        assert result.returncode == 0 and not result.stderr.strip(), (drop_in, result.stderr)


@needs_systemd_analyze
def test_systemd_analyze_security_rates_the_unit_ok_or_better() -> None:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
                            capture_output=True, text=True, check=False)
    match = re.search(r"Overall exposure level for edgefleet.service: ([0-9.]+) (\w+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    score, band = float(match[1]), match[2]
    print(f"systemd-analyze security: {score} {band}")
    assert band in ("PERFECT", "SAFE", "OK") and score < 2.0, (score, band)


@needs_systemd_analyze
def test_tmpfiles_rule_lets_the_agent_group_read_rapl_counters(tmp_path: Path) -> None:
    """On a fake sysfs tree: energy_uj root-only (as since Linux 5.10) becomes root:edgefleet 0440."""
    if shutil.which("systemd-tmpfiles") is None:
        pytest.skip("systemd-tmpfiles is not installed")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n"
                                         "edgefleet:x:997:997::/var/lib/edgefleet:/usr/sbin/nologin\n")
    (root / "etc" / "group").write_text("root:x:0:\nedgefleet:x:997:\n")
    zones = [root / "sys/class/powercap/intel-rapl:0", root / "sys/class/powercap/intel-rapl:0:0"]
    for zone in zones:
        zone.mkdir(parents=True)
        (zone / "energy_uj").write_text("123456\n")
        (zone / "energy_uj").chmod(0o400)
    result = subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", str(REPO / "packaging/tmpfiles.conf")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    for zone in zones:
        st = (zone / "energy_uj").stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 997, 0o440)
    state = (root / "var/lib/edgefleet").stat()
    assert (state.st_uid, state.st_gid, state.st_mode & 0o777) == (997, 997, 0o750)


# --- the .deb ---------------------------------------------------------------------------

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None or not Path("/usr/bin/python3.11").exists(),
                                reason="needs dpkg-deb and Debian's python3.11")


@pytest.fixture(scope="module")
def deb(deb_package: Path) -> Path:
    return deb_package


def _dpkg_deb(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
@needs_dpkg
def test_deb_has_the_agent_venv_unit_conffile_and_maintainer_scripts(deb: Path, tmp_path: Path) -> None:
    fields = dict(line.split(": ", 1) for line in _dpkg_deb("-f", str(deb)).splitlines() if ": " in line)
    assert fields["Package"] == "edgefleet" and fields["Version"] == "0.1.0"
    assert fields["Architecture"] == subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                                                    text=True, check=True).stdout.strip()
    assert "python3.11" in fields["Depends"] and "systemd" in fields["Depends"]
    assert int(fields["Installed-Size"]) > 50_000

    listing = _dpkg_deb("-c", str(deb))
    for path in ("./usr/lib/systemd/system/edgefleet.service", "./etc/edgefleet/agent.toml",
                 "./opt/edgefleet/venv/bin/edgefleet",
                 "./opt/edgefleet/venv/lib/python3.11/site-packages/agent/kserve/",
                 "./usr/lib/sysusers.d/edgefleet.conf", "./usr/lib/tmpfiles.d/edgefleet.conf",
                 "./usr/lib/udev/rules.d/70-edgefleet-rapl.rules", "./usr/share/edgefleet/systemd/gpu-nvidia.conf",
                 "./usr/share/doc/edgefleet/operations.md", "./usr/bin/edgefleet -> /opt/edgefleet/venv/bin/edgefleet"):
        assert path in listing, path
    assert "root/root" in listing.splitlines()[0]
    # no model weights (onnxruntime's own sample models under onnxruntime/datasets aside), none of our tests
    assert not re.search(r"\.gguf$|^(?!.*onnxruntime/datasets/).*\.onnx$|site-packages/(tests|conftest)", listing,
                         re.M), "weights or our tests in the package"

    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    assert (control / "conffiles").read_text().split() == ["/etc/edgefleet/agent.toml"]
    for script in ("postinst", "prerm", "postrm"):
        path = control / script
        assert os.access(path, os.X_OK)
        assert subprocess.run(["sh", "-n", str(path)], check=False).returncode == 0
    postinst = (control / "postinst").read_text()
    assert "deb-systemd-helper enable" in postinst and "try-restart" in postinst
    assert "systemctl start" not in postinst.replace("'systemctl start edgefleet'", "")  # never started on install
    assert "rm -rf" in (control / "postrm").read_text().split('"purge"')[1]  # state removed on purge only

    # the venv names its installed paths, not the build directory
    root = tmp_path / "x"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    shebang = (root / "opt/edgefleet/venv/bin/edgefleet").read_text().splitlines()[0]
    assert shebang == "#!/opt/edgefleet/venv/bin/python"


def _dpkg_root(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dpkg", f"--root={root}", "--force-script-chrootless", "--force-depends", *args],
                          capture_output=True, text=True, check=False)


@pytest.mark.slow
@needs_dpkg
async def test_deb_installs_into_a_throwaway_root_runs_doctor_and_purges_only_on_purge(
        deb: Path, tmp_path: Path, state_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("dpkg --root with maintainer scripts needs root")
    root = tmp_path / "root"
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers", "etc"):
        (root / d).mkdir(parents=True)
    for f in ("status", "available", "statoverride"):
        (root / "var/lib/dpkg" / f).touch()
    result = _dpkg_root(root, "-i", str(deb))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "installed and enabled, not started" in result.stdout
    assert "edgefleet:x:" in (root / "etc/passwd").read_text()
    gid = int(next(line for line in (root / "etc/group").read_text().splitlines()
                   if line.startswith("edgefleet:")).split(":")[2])
    conf = (root / "etc/edgefleet/agent.toml").stat()
    assert (conf.st_gid, conf.st_mode & 0o777) == (gid, 0o640)  # may hold the API key
    assert (root / "var/lib/edgefleet").stat().st_gid == gid
    assert (root / "etc/systemd/system/multi-user.target.wants/edgefleet.service").is_symlink()

    # The installed agent runs from its own venv on Debian's python3.11.
    python = root / "opt/edgefleet/venv/bin/python"
    script = root / "opt/edgefleet/venv/bin/edgefleet"
    version = subprocess.run([str(python), str(script), "--version"], capture_output=True, text=True, check=False)
    assert version.stdout.strip() == "edgefleet 0.1.0", version.stderr
    config = tmp_path / "agent.toml"
    config.write_text((root / "etc/edgefleet/agent.toml").read_text()
                      + f'\n[[models]]\nname = "{CHAT}"\n[[models]]\nname = "{EMBED}"\n')
    doctor = subprocess.run([str(python), str(script), "doctor", "--config", str(config),
                             "--state-dir", str(state_dir)],
                            capture_output=True, text=True, check=False, env={**os.environ, "EDGEFLEET_CONFIG": ""})
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert f"[ok  ] model {CHAT}: gguf" in doctor.stdout and "no problems found" in doctor.stdout
    broken = subprocess.run([str(python), str(script), "doctor", "--config", str(config),
                             "--state-dir", str(tmp_path / "nowhere")], capture_output=True, text=True, check=False)
    assert broken.returncode == 1 and "fix:" in broken.stdout

    # and serves, on Debian's python and libffi, under the unit's no-write+execute rule
    port = free_port()
    agent = ServiceProcess(write_config(tmp_path / "serve.toml", state_dir, port, [CHAT, EMBED]), tmp_path,
                           preexec_fn=deny_write_execute if kernel_has_mdwe() else None,
                           command=[str(python), str(script)])
    try:
        ready = await agent.notify.wait_for("READY", "1")
        assert ready.fields["STATUS"] == f"serving 2 model(s): {EMBED}, {CHAT}", agent.log()
        agent.signal(signal.SIGTERM)
        assert await agent.wait_exit(timeout=30) == 0
    finally:
        agent.stop()

    # remove keeps models, keys and config; purge removes them
    (root / "var/lib/edgefleet/models").mkdir()
    assert _dpkg_root(root, "-r", "edgefleet").returncode == 0
    assert (root / "var/lib/edgefleet/models").is_dir() and (root / "etc/edgefleet/agent.toml").is_file()
    assert not (root / "opt/edgefleet/venv").exists()
    assert _dpkg_root(root, "-P", "edgefleet").returncode == 0
    assert not (root / "var/lib/edgefleet").exists() and not (root / "etc/edgefleet").exists()
    assert (root / "var/lib/dpkg/statoverride").read_text() == ""
