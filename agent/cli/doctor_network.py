"""`edgefleet doctor`'s checks that touch the network: the agent's ports, the MQTT broker, the hub.

Each does for real what the agent will do at start, so a pass means the agent's
own attempt works too: bind the ports, connect to the broker with the config's
TLS files and credentials (MQTT 5, a client id of doctor's own so the running
agent's session is left alone), and refresh the hub's TUF metadata from the
configured trust root, in a temporary directory (the agent's ``<state_dir>/tuf``
is not touched). Every step has a short overall timeout: a check that cannot
reach something says so and doctor goes on.
"""

from __future__ import annotations

import errno
import socket
import ssl
import tempfile
import threading
from pathlib import Path

from agent.cli.findings import Finding, Level
from agent.config import AgentConfig
from runtime.state_lock import holder
from sync.mqtt.settings import MqttSettings

#: The longest one network check waits (connect, handshake, answer).
TIMEOUT_S = 5.0


def check_ports(config: AgentConfig) -> list[Finding]:
    """The HTTP port (and gRPC's, when on) can be bound; a port the running agent holds is fine."""
    server = config.server
    ports = [("port", server.port, "--port")]
    if server.grpc_port:
        ports.append(("grpc_port", server.grpc_port, "--grpc-port"))
    running = holder(Path(config.state_dir))
    findings = []
    for key, port, option in ports:
        where = f"{server.host}:{port}"
        if port == 0:
            findings.append(Finding(Level.OK, f"server.{key}", "0: any free port, chosen at start"))
            continue
        try:
            family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp and grpc bind
                sock.bind((server.host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and running and running[0]:
                findings.append(Finding(Level.OK, f"server.{key}", f"{where} is in use, by the running agent "
                                        f"(pid {running[0]}, which holds {config.state_dir})"))
            elif exc.errno == errno.EADDRINUSE:
                findings.append(Finding(Level.FAIL, f"server.{key}", f"{where} is in use by another program",
                                        f"stop it (ss -ltnp 'sport = :{port}' names it), or set server.{key} "
                                        f"(or {option}) to a free port"))
            elif exc.errno == errno.EACCES:
                findings.append(Finding(Level.FAIL, f"server.{key}", f"{where}: ports below 1024 need privileges",
                                        f"use a port of 1024 or more (server.{key})"))
            else:
                findings.append(Finding(Level.FAIL, f"server.{key}", f"cannot listen on {where}: {exc.strerror}",
                                        "set server.host to an address of this machine (127.0.0.1, 0.0.0.0)"))
        else:
            findings.append(Finding(Level.OK, f"server.{key}", f"{where} is free"))
    return findings


def check_mqtt(settings: MqttSettings) -> list[Finding]:
    """``[mqtt]``: its files are readable, and the broker accepts this device's connection."""
    if not settings.enabled:
        return [Finding(Level.OK, "mqtt", "off (no [mqtt] host): the agent serves locally only")]
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    from security.tls import client_context

    where = f"{settings.host}:{settings.broker_port}"
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{settings.client_id}-doctor",
                         protocol=MQTTProtocolVersion.MQTTv5)
    try:
        if settings.tls:
            client.tls_set_context(client_context(settings.ca_file, settings.cert_file, settings.key_file))
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.read_password())
    except ValueError as exc:  # names the file
        return [Finding(Level.FAIL, "mqtt", f"mqtt.{exc}",
                        "make the file readable by the agent's user (or fix its path in [mqtt])")]
    findings = _check_client_certificate(settings)
    if any(f.level is Level.FAIL for f in findings):
        return findings
    answer: dict[str, object] = {}
    answered = threading.Event()

    def on_connect(client: paho.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        answer["reason"] = reason
        answered.set()

    client.on_connect = on_connect
    fix_reach = ("check mqtt.host and mqtt.port and that the broker runs (the agent serves without MQTT and "
                 "connects when the broker comes)")
    try:
        client.connect(settings.host or "", settings.broker_port, keepalive=max(5, int(TIMEOUT_S) * 2))
    except ssl.SSLError as exc:
        return [Finding(Level.FAIL, "mqtt", f"TLS with {where} failed: {exc.reason or exc}",
                        "check mqtt.ca_file (the CA that signed the broker's certificate) and that mqtt.host is "
                        "the name in that certificate")]
    except OSError as exc:
        return [Finding(Level.FAIL, "mqtt", f"broker {where} unreachable: {exc.strerror or exc}", fix_reach)]
    client.loop_start()
    try:
        if not answered.wait(TIMEOUT_S):
            return [Finding(Level.FAIL, "mqtt", f"broker {where} did not answer the MQTT connect within "
                            f"{TIMEOUT_S:g}s", fix_reach + "; a TLS port needs mqtt.tls = true")]
        reason = answer["reason"]
        if getattr(reason, "is_failure", False):
            return [Finding(Level.FAIL, "mqtt", f"broker {where} refused this device: {reason}",
                            "check mqtt.username and mqtt.password_file (or the client certificate) against the "
                            "broker's accounts")]
    finally:
        client.disconnect()
        client.loop_stop()
    who = f" as {settings.username}" if settings.username else ""
    return [*findings, Finding(Level.OK, "mqtt", f"connected to {where}{who}{' over TLS' if settings.tls else ''} "
                               f"(device {settings.device_id}, group {settings.group})")]


#: a client certificate that expires sooner than this is a warning
CERT_WARN_DAYS = 14


def _check_client_certificate(settings: MqttSettings) -> list[Finding]:
    """With a client certificate: its dates (expired, not yet valid, soon to expire), then the
    broker's answer to the TLS handshake alone (revoked, unknown CA), which paho cannot name."""
    if not settings.tls or settings.cert_file is None:
        return []
    import datetime as dt

    from security.tls import client_context
    from security.tls_probe import certificate_dates, handshake_outcome

    renew = "renew the device's certificate (mqtt.cert_file / mqtt.key_file) from the fleet's CA"
    try:
        dates = certificate_dates(settings.cert_file)
    except ValueError as exc:
        return [Finding(Level.FAIL, "mqtt certificate", str(exc), "point mqtt.cert_file at the device's PEM "
                        "certificate")]
    expired = dates.problem()
    if expired is not None:
        return [Finding(Level.FAIL, "mqtt certificate", f"{settings.cert_file} (CN={dates.subject}) {expired}: the "
                        "broker refuses it; the agent serves locally meanwhile", renew)]
    left = dates.not_after - dt.datetime.now(dt.UTC)
    level = Level.WARN if left < dt.timedelta(days=CERT_WARN_DAYS) else Level.OK
    findings = [Finding(level, "mqtt certificate", f"{settings.cert_file} (CN={dates.subject}) valid until "
                        f"{dates.not_after:%Y-%m-%d} ({left.days} days)", renew if level is Level.WARN else "")]
    try:
        cause = handshake_outcome(settings.host or "", settings.broker_port,
                                  client_context(settings.ca_file, settings.cert_file, settings.key_file), TIMEOUT_S)
    except (OSError, ValueError):
        return findings  # unreachable or unreadable: the connect check below says so
    if cause is not None:
        findings.append(Finding(Level.FAIL, "mqtt", f"broker {settings.host}:{settings.broker_port} refused this "
                                f"device's TLS certificate: {cause}; the agent serves locally meanwhile",
                                renew + " (a revoked certificate needs a new one, not the same one again)"))
    return findings


def check_updates(config: AgentConfig) -> list[Finding]:
    """``[updates]``: the trust root is readable and valid root metadata, and the hub at hub_url
    serves metadata that verifies against it (a full TUF refresh, into a temporary directory)."""
    settings = config.updates
    if not settings.enabled or settings.hub_url is None:
        return [Finding(Level.OK, "updates", "off (no [updates] hub_url)")]
    from security.errors import SecurityError, TrustRootError
    from security.trust import parse_trust_root
    from sync.errors import HubUnreachable, SyncError
    from sync.tuf_client import HubClient

    try:
        trust_root = Path(settings.trust_root).read_bytes()
    except OSError as exc:
        return [Finding(Level.FAIL, "updates", f"trust root {settings.trust_root}: {exc.strerror}",
                        "copy the hub's trust-root.json there (written by `edgefleet hub init`), readable by the "
                        "agent's user, or set updates.trust_root")]
    try:
        root = parse_trust_root(trust_root)
    except TrustRootError as exc:
        return [Finding(Level.FAIL, "updates", f"trust root {settings.trust_root}: {exc}",
                        "copy the hub's trust-root.json again: this file is not it")]
    findings = [Finding(Level.OK, "updates", f"trust root {settings.trust_root}: root v{root.signed.version}, valid")]
    hub_fix = ("check updates.hub_url: it is the URL of the hub's repository/ directory, which `edgefleet hub "
               "serve` serves at its root (http://HUB:8000); and that the hub is up")
    with tempfile.TemporaryDirectory(prefix="edgefleet-doctor-") as scratch:
        client = HubClient(Path(scratch) / "tuf", settings.hub_url, trust_root, config.mqtt.group,
                           config.mqtt.device_id, timeout_s=min(TIMEOUT_S, settings.read_timeout_s),
                           refresh_timeout_s=min(3 * TIMEOUT_S, settings.refresh_timeout_s))
        try:
            view = client.refresh()
        except HubUnreachable as exc:
            return [*findings, Finding(Level.FAIL, "updates", f"hub {settings.hub_url} unreachable: {exc}", hub_fix)]
        except (SecurityError, SyncError) as exc:
            return [*findings, Finding(Level.FAIL, "updates", f"hub {settings.hub_url}: {exc}",
                                       "the trust root is another hub's (copy this hub's trust-root.json), or "
                                       "the hub's metadata expired (run `edgefleet hub refresh` on the hub)")]
    models = ", ".join(f"{m.name}={m.version}" for m in view.models.values()) or "nothing published yet"
    return [*findings, Finding(Level.OK, "updates", f"hub {settings.hub_url}: metadata verified (targets "
                               f"v{view.targets_version}); this device should run: {models}")]
