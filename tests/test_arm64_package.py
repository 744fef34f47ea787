"""The arm64 .deb, cross-built on this amd64 machine and run under qemu-user-static.

Off by default: the first time it compiles llama.cpp for arm64 (22 CPU-minutes, 40 minutes
on 2 busy cores; the wheel is then cached in dist/wheel-cache), and the emulated agent takes
seconds per embedding request. Run it with

    EDGEFLEET_TEST_ARM64=1 scripts/setup.sh --test
    EDGEFLEET_TEST_ARM64=1 .venv/bin/python -m pytest tests/test_arm64_package.py -s

It needs root (chroot, mount), gcc-aarch64-linux-gnu, g++-aarch64-linux-gnu, cmake,
qemu-user-static and debootstrap (which setup.sh installs with EDGEFLEET_TEST_ARM64=1), and
the network for PyPI and deb.debian.org.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", "cmake", "file", "qemu-aarch64-static", "debootstrap")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("EDGEFLEET_TEST_ARM64") != "1",
                       reason="set EDGEFLEET_TEST_ARM64=1 (cross-builds llama.cpp for arm64, runs it under qemu)"),
]


def test_arm64_deb_cross_builds_and_serves_onnx_under_qemu(tmp_path: Path) -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    assert not missing, f"apt install the tools for: {missing}"
    assert os.geteuid() == 0, "the emulated run needs root (chroot, mount)"
    build = subprocess.run([str(REPO / "packaging/build-deb.sh"), "--arch", "arm64", "--out", str(tmp_path),
                            "--compression", "gzip"], capture_output=True, text=True, check=False, timeout=3600)
    assert build.returncode == 0, build.stderr[-3000:]
    deb = Path(build.stdout.strip().splitlines()[-1])
    assert deb.name == "edgefleet_0.1.0_arm64.deb"
    fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Architecture"], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert fields == "arm64"

    # the native code a user's arm64 machine will load is arm64 code
    root = tmp_path / "x"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    site = root / "opt/edgefleet/venv/lib/python3.11/site-packages"
    libs = [site / "llama_cpp/lib/libllama.so", *(site / "llama_cpp/lib").glob("libggml-cpu-armv8*.so"),
            *(site / "onnxruntime/capi").glob("onnxruntime_pybind11_state*.so"),
            *(site / "numpy/_core").glob("_multiarray_umath*.so")]
    assert len(libs) >= 4, libs
    for lib in libs:
        kind = subprocess.run(["file", "-L", str(lib)], capture_output=True, text=True, check=True).stdout
        assert "ARM aarch64" in kind, kind

    smoke = subprocess.run([str(REPO / "packaging/smoke-arm64.sh"), str(deb)], capture_output=True, text=True,
                           check=False, timeout=3600)
    print(smoke.stdout[-4000:])
    assert smoke.returncode == 0, smoke.stdout[-3000:] + smoke.stderr[-3000:]
    assert "edgefleet 0.1.0" in smoke.stdout
    assert "[ok  ] model all-minilm-l6-v2: onnx" in smoke.stdout
    match = re.search(r"1 - cosine <= ([0-9.e+-]+)", smoke.stdout)
    assert match and float(match[1]) < 1e-3, smoke.stdout[-2000:]
    # KServe v2 over gRPC (grpcio's arm64 extension) answers what HTTP answered
    match = re.search(r"arm64 gRPC vs arm64 HTTP max \|diff\| ([0-9.e+-]+)", smoke.stdout)
    assert match and float(match[1]) <= 1e-6, smoke.stdout[-2000:]
