"""The pieces the service is made of, each against the real OS interface it speaks to:
a notify socket bound by the test, journald's stream convention, a fake sysfs tree,
and `edgefleet doctor` run as an operator runs it."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import CHAT, EMBED

from agent.cli.doctor import Level, check_energy
from agent.lifecycle.logs import LogfmtFormatter, stream_is_journal
from agent.lifecycle.sdnotify import Notifier, watchdog_interval_s
from runtime.devices import CpuDescription, missing_cpu_features


def test_notifier_speaks_to_abstract_and_path_sockets_and_is_silent_without_one(tmp_path: Path) -> None:
    for address in (f"@edgefleet-unit-{os.getpid()}", str(tmp_path / "notify")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind("\0" + address[1:] if address.startswith("@") else address)
            notifier = Notifier(address)
            assert notifier.send(READY=1, STATUS="serving\n2 models")
            assert server.recv(4096) == b"READY=1\nSTATUS=serving 2 models"
            notifier.close()
    silent = Notifier("")
    assert not silent.enabled and silent.send(READY=1) is False


def test_a_vanished_notify_socket_is_reported_once_not_raised(tmp_path: Path, caplog) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    with caplog.at_level(logging.WARNING):
        assert notifier.send(WATCHDOG=1) is False
        assert notifier.send(WATCHDOG=1) is False
    assert len([r for r in caplog.records if "cannot notify systemd" in r.getMessage()]) == 1


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_our_pid() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())}) == 0.2
    assert watchdog_interval_s({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({}) is None and watchdog_interval_s({"WATCHDOG_USEC": "x"}) is None


def _record(msg: str, level: int = logging.INFO, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("runtime.registry", level, __file__, 1, msg, None, None)
    record.__dict__.update(extra)
    return record


def test_log_lines_are_logfmt_with_fields_and_a_journald_priority() -> None:
    line = LogfmtFormatter(journald=True).format(_record('model "x" ready', model="x", seconds=0.5))
    assert line == '<6>level=info logger=runtime.registry msg="model \\"x\\" ready" model=x seconds=0.5'
    warning = LogfmtFormatter(journald=True).format(_record("slow", logging.WARNING))
    assert warning.startswith("<4>level=warning")
    plain = LogfmtFormatter().format(_record("hi"))
    assert plain.startswith("time=") and " level=info logger=runtime.registry msg=hi" in plain
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = _record("unexpected", logging.ERROR)
        record.exc_info = sys.exc_info()
    one = LogfmtFormatter(journald=True).format(record)
    assert "\n" not in one and 'exc="Traceback' in one and "ValueError: boom\\nsecond line" in one


def test_journal_stream_is_recognised_by_device_and_inode(tmp_path: Path) -> None:
    with (tmp_path / "log").open("w") as stream:
        st = os.fstat(stream.fileno())
        assert stream_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not stream_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not stream_is_journal(stream, {})
    assert not stream_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def test_a_llama_build_for_a_newer_cpu_is_caught() -> None:
    info = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | AVX512 = 0 | OPENMP = 1 |"
    old_x86 = CpuDescription("x86_64", frozenset({"pni", "ssse3", "avx"}))
    assert missing_cpu_features(info, old_x86) == ["AVX2", "F16C", "FMA"]
    new_x86 = dataclasses.replace(old_x86, flags=frozenset({"pni", "ssse3", "avx", "avx2", "f16c", "fma"}))
    assert missing_cpu_features(info, new_x86) == []
    arm_info = "CPU : NEON = 1 | ARM_FMA = 1 | DOTPROD = 1 | SVE = 1 | OPENMP = 1 |"
    pi4 = CpuDescription("aarch64", frozenset({"fp", "asimd"}))
    assert missing_cpu_features(arm_info, pi4) == ["DOTPROD", "SVE"]


def test_energy_check_on_a_fake_powercap_tree(tmp_path: Path) -> None:
    assert check_energy(tmp_path / "none")[0].level is Level.WARN
    for zone in ("intel-rapl:0", "intel-rapl:1"):
        (tmp_path / zone).mkdir()
        (tmp_path / zone / "energy_uj").write_text("1\n")
    finding = check_energy(tmp_path)[0]
    assert finding.level is Level.OK and "2 RAPL counters readable" in finding.detail


def _doctor(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "doctor", "--config", str(config), *args],
                          capture_output=True, text=True, check=False, timeout=120,
                          env={**os.environ, "EDGEFLEET_CONFIG": ""})


def test_doctor_passes_a_good_setup_and_names_the_fix_for_a_bad_one(tmp_path: Path, state_dir: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(f'state_dir = "{state_dir}"\n[[models]]\nname = "{CHAT}"\n[[models]]\nname = "{EMBED}"\n')
    result = _doctor(good)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[ok  ] llama.cpp:" in result.stdout and "[ok  ] onnxruntime: providers:" in result.stdout
    assert f"[ok  ] model {EMBED}: onnx" in result.stdout and "GiB free in" in result.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text(f'state_dir = "{state_dir}"\n[server]\nhost = "0.0.0.0"\n[[models]]\nname = "ghost"\n')
    result = _doctor(bad)
    assert result.returncode == 1
    assert "[FAIL] api key: none, and the agent listens on 0.0.0.0" in result.stdout
    assert "[FAIL] model ghost:" in result.stdout and "fix: put the bundle at" in result.stdout
    assert "2 problem(s) to fix" in result.stdout

    broken = tmp_path / "broken.toml"
    broken.write_text("[server]\nport = 'x'\n")
    result = _doctor(broken)
    assert result.returncode == 1 and "[FAIL] config:" in result.stdout and "server.port" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
