"""`edgefleet serve --demo` as its own process, as an operator (or systemd) runs it:
for what only a real process shows — its memory, its exit, its log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from conftest import free_port


@dataclass
class AgentProcess:
    proc: subprocess.Popen
    url: str
    log_path: Path
    #: host:port of its KServe v2 gRPC server
    grpc: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def status(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) of the agent, in MB."""
        values = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) // 1024
        return values

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 90) -> tuple[int, float]:
        """SIGTERM; (exit status, seconds until it exited)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        return code, time.monotonic() - started


@contextmanager
def serve(state_dir: Path, log_dir: Path, **env: object) -> Iterator[AgentProcess]:
    """An agent serving the demo models; `env` sets config keys (`server__drain_timeout_s=4`).
    gRPC goes on a free port rather than --demo's 8081, so agents never collide."""
    port = free_port()
    log_path = log_dir / f"agent-{port}.log"
    environ = {**os.environ, "EDGEFLEET_CONFIG": ""}
    env.setdefault("server__grpc_port", free_port())
    environ.update({f"EDGEFLEET_{k.upper()}": str(v) for k, v in env.items()})
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "serve", "--demo", "--state-dir", str(state_dir), "--port", str(port)],
            stdout=log_file, stderr=subprocess.STDOUT, env=environ,
        )
    agent = AgentProcess(proc, f"http://127.0.0.1:{port}", log_path, f"127.0.0.1:{env['server__grpc_port']}")
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(agent.url + "/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, agent.log()
            assert time.monotonic() < deadline, "the agent did not become ready"
            time.sleep(0.2)
        yield agent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
