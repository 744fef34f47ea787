"""A private RabbitMQ node with its MQTT plugin, on free loopback ports: the MQTT 3.1.1 broker.

Debian's rabbitmq-server (3.10) speaks MQTT 3.1.1 only, which is what the agent's
protocol fallback is tested against (tests/test_mqtt_brokers.py). The node is a
child process of the test run, with everything it writes in one temp dir: its
own node name, Mnesia and log dirs, enabled-plugins file, config file, Erlang
cookie (``HOME``) and its own epmd port, so it neither needs nor touches a system
RabbitMQ. The default ``guest`` user is allowed from loopback and is the MQTT
default user, so clients connect anonymously as with tests/mqtt_broker.py.

`stop()` sends SIGTERM (RabbitMQ's script turns it into a clean shutdown) and
then stops the private epmd that the node started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from mqtt_broker import free_port

#: The server script itself: /usr/sbin/rabbitmq-server is a wrapper that switches to the rabbitmq user.
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
EPMD = shutil.which("epmd") or "/usr/bin/epmd"


def rabbitmq_installed() -> bool:
    return os.path.exists(RABBITMQ_SERVER) and shutil.which("erl") is not None


class RabbitMqBroker:
    """One RabbitMQ node; `host` / `port` is its MQTT listener (the same shape as `MosquittoBroker`)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = free_port()
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.node = f"edgefleet-{self.port}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"rabbitmq-{self.port}.out"

    def _environment(self) -> dict[str, str]:
        base = self.workdir / f"rabbitmq-{self.port}"
        for sub in ("mnesia", "log", "home"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {self.host}:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = {self.host}:{self.port}\n"
            "mqtt.allow_anonymous = true\n"
            "mqtt.default_user = guest\n"
            "mqtt.default_pass = guest\n"
            "mqtt.vhost = /\n"
            "mqtt.exchange = amq.topic\n"
            "log.console = true\n"
            "log.console.level = warning\n"
            "log.file = false\n")
        (base / "rabbitmq-env.conf").write_text("")
        return {
            **os.environ,
            "HOME": str(base / "home"),  # the Erlang cookie goes here
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": self.host,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(base / "plugins-expand"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
            "RABBITMQ_USE_LONGNAME": "false",
        }

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the node and return once its MQTT listener accepts connections."""
        if self.running:
            return
        if not rabbitmq_installed():
            raise RuntimeError("rabbitmq-server is not installed (scripts/setup.sh --test installs it)")
        env = self._environment()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([RABBITMQ_SERVER], stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited ({self.proc.returncode}): "
                                   f"{self.log_path.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.5):
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"RabbitMQ's MQTT listener did not open on {self.port} within {timeout_s:g}s: "
                           f"{self.log_path.read_text(errors='replace')[-3000:]}")

    def stop(self, timeout_s: float = 60.0) -> None:
        """A clean shutdown (SIGTERM to the server script), then the node's private epmd."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            self.proc = None
        if os.path.exists(EPMD):
            subprocess.run([EPMD, "-port", str(self.epmd_port), "-kill"], capture_output=True, timeout=10,
                           check=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def running_rabbitmq(workdir: Path) -> Iterator[RabbitMqBroker]:
    broker = RabbitMqBroker(workdir)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
