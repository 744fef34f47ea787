"""Per-device identity on the broker: mosquitto with client certificates and an ACL.

The broker is the setup docs/security.md shows: TLS, ``require_certificate true``,
``use_identity_as_username true`` (the certificate's CN is the MQTT user), a CRL, and
an ACL whose ``pattern`` lines use ``%u``; the hub has a ``user hub`` block. Certificates
are made here with `cryptography`: a CA, one per device (CN = device id), the hub's.

Real agents A and B connect with their ``[mqtt]`` TLS settings, unchanged: A's birth,
reported state and telemetry arrive; A's own link publishing on B's topic gets the
broker's PUBACK "Not authorized" (PublishRefusedError) and nothing reaches B; A's
certificate cannot read B's commands; the hub's tools (`hub status`, a doorbell) reach
every device through TLS. An agent whose certificate is revoked or expired names the
cause in its log and in `edgefleet doctor`, and goes on serving locally.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from conftest import demo_config, start_agent
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mqtt_broker import MosquittoBroker, Watcher, free_port

from agent.config import TelemetryConfig
from agent.context import MQTT
from sync.errors import PublishRefusedError
from sync.hub.mqtt_tools import Broker, ring_doorbell
from sync.mqtt import MqttSettings

REPO = Path(__file__).resolve().parent.parent
PREFIX = "edgefleet/v1"
GROUP = "lab"
ACL = f"""\
# the hub reaches everything
user hub
topic readwrite {PREFIX}/#

# every device: its own topics only (%u is the certificate's CN, the device id)
pattern write {PREFIX}/devices/%u/#
pattern read {PREFIX}/devices/%u/cmd
pattern read {PREFIX}/devices/%u/desired
pattern read {PREFIX}/groups/+/desired
"""
NOW = dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def context(self, name: str) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(self.cert(name), self.key(name))
        return context


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def make_pki(directory: Path) -> tuple[Pki, int]:
    """A CA; the broker's certificate (127.0.0.1); A, B, C (revoked), D (expired), the hub's,
    and a CRL revoking C. Returns the PKI and C's serial."""
    directory.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(NOW - dt.timedelta(days=1))
          .not_valid_after(NOW + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    serials = {}

    def issue(name: str, server: bool = False, not_after: dt.datetime | None = None) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(NOW - dt.timedelta(days=2))
                   .not_valid_after(not_after or NOW + dt.timedelta(days=30)))
        if server:
            import ipaddress

            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        serials[name] = cert.serial_number
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(directory / f"{name}.key", key)

    issue("broker", server=True)
    for name in ("dev-a", "dev-b", "dev-c", "hub"):
        issue(name)
    issue("dev-d", not_after=NOW - dt.timedelta(days=1))
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca_name).last_update(NOW - dt.timedelta(hours=1))
           .next_update(NOW + dt.timedelta(days=7))
           .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serials["dev-c"])
                                    .revocation_date(NOW - dt.timedelta(hours=1)).build())
           .sign(ca_key, hashes.SHA256()))
    (directory / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    (directory / "acl").write_text(ACL)
    return Pki(directory, directory / "ca.pem"), serials["dev-c"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("broker-identity") / "pki")[0]


@pytest.fixture(scope="module")
def broker(pki: Pki) -> Iterator[MosquittoBroker]:
    port = free_port()
    config = (f"listener {port} 127.0.0.1\n"
              f"cafile {pki.ca}\ncertfile {pki.cert('broker')}\nkeyfile {pki.key('broker')}\n"
              "require_certificate true\nuse_identity_as_username true\n"
              f"crlfile {pki.dir / 'crl.pem'}\nacl_file {pki.dir / 'acl'}\n")
    broker = MosquittoBroker(pki.dir.parent, port=port, extra_config=config)
    broker.start()
    yield broker
    broker.stop()


def device_config(tmp: Path, pki: Pki, broker: MosquittoBroker, device: str):  # type: ignore[no-untyped-def]
    """An agent with no models: the link, telemetry and the HTTP port are what is tested."""
    return replace(demo_config(tmp / device, ()),
                   mqtt=MqttSettings(host=broker.host, port=broker.port, tls=True, ca_file=str(pki.ca),
                                     cert_file=str(pki.cert(device)), key_file=str(pki.key(device)),
                                     device_id=device, group=GROUP, reconnect_min_s=0.2, reconnect_max_s=1.0),
                   telemetry=TelemetryConfig(interval_s=0.5, energy_sample_s=0.25))


def hub_args(pki: Pki, broker: MosquittoBroker) -> list[str]:
    return ["--mqtt", f"{broker.host}:{broker.port}", "--mqtt-ca", str(pki.ca), "--mqtt-cert", str(pki.cert("hub")),
            "--mqtt-key", str(pki.key("hub"))]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False, env={"PATH": "/usr/bin:/bin", "EDGEFLEET_CONFIG": ""})


async def test_each_device_reaches_only_its_own_topics_and_the_hub_reaches_all(
        pki: Pki, broker: MosquittoBroker, tmp_path: Path) -> None:
    devices = f"{PREFIX}/devices"
    with Watcher(broker, f"{devices}/#", tls=pki.context("hub")) as hub, \
            Watcher(broker, f"{devices}/dev-b/cmd", tls=pki.context("dev-a")) as a_snooping, \
            Watcher(broker, f"{devices}/dev-b/cmd", f"{PREFIX}/groups/{GROUP}/desired",
                    tls=pki.context("dev-b")) as b_listening:
        async with start_agent(device_config(tmp_path, pki, broker, "dev-a")) as a, \
                start_agent(device_config(tmp_path, pki, broker, "dev-b")):
            for topic in ("state", "reported", "telemetry"):
                await hub.wait(f"{devices}/dev-a/{topic}", timeout_s=20)
            await hub.wait(f"{devices}/dev-b/state", timeout_s=20)
            assert json.loads(hub.on(f"{devices}/dev-a/state")[-1].payload)["online"] is True
            # A's own link, publishing as B: the broker's PUBACK says no
            with pytest.raises(PublishRefusedError, match="Not authorized"):
                await a.app[MQTT].publish(f"{devices}/dev-b/cmd", {"action": "check-updates"})
            with pytest.raises(PublishRefusedError, match="Not authorized"):
                await a.app[MQTT].publish(f"{devices}/dev-b/state", {"online": False}, retain=True)
            # the hub's command to B: B's certificate reads it, A's does not
            hub.publish(f"{devices}/dev-b/cmd", b'{"action": "check-updates"}')
            await b_listening.wait(f"{devices}/dev-b/cmd")
            # the hub's tools, through TLS with the hub's certificate
            broker_spec = Broker(broker.host, broker.port, ca_file=str(pki.ca), cert_file=str(pki.cert("hub")),
                                 key_file=str(pki.key("hub")))
            await asyncio.to_thread(ring_doorbell, broker_spec, f"{PREFIX}/groups/{GROUP}/desired", b'{"serial": 1}')
            await b_listening.wait(f"{PREFIX}/groups/{GROUP}/desired")
            done = await asyncio.to_thread(run_cli, "hub", "status", *hub_args(pki, broker), "--json")
            assert done.returncode == 0, done.stderr
            rows = {row["device"]: row for row in json.loads(done.stdout)}
            assert rows["dev-a"]["online"] is True and rows["dev-b"]["online"] is True
        assert a_snooping.on(f"{devices}/dev-b/cmd") == []
        # nothing A tried reached B's topics: only the hub's own command is there
        assert [m.payload for m in b_listening.on(f"{devices}/dev-b/cmd")] == [b'{"action": "check-updates"}']
        assert [json.loads(m.payload).get("online") for m in hub.on(f"{devices}/dev-b/state")
                if m.payload].count(False) <= 1  # B's own offline at its stop, never A's


def test_the_hub_without_its_certificate_is_refused_in_one_line(pki: Pki, broker: MosquittoBroker) -> None:
    done = run_cli("hub", "status", "--mqtt", f"{broker.host}:{broker.port}", "--mqtt-ca", str(pki.ca))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize(("device", "cause"), [("dev-c", "certificate revoked"), ("dev-d", "expired on")])
async def test_a_revoked_or_expired_certificate_is_named_and_the_agent_keeps_serving(
        pki: Pki, broker: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture, device: str,
        cause: str) -> None:
    caplog.set_level(logging.INFO)
    config = device_config(tmp_path, pki, broker, device)
    async with start_agent(config) as agent:
        for _ in range(200):
            if any(cause in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError([r.getMessage() for r in caplog.records if r.name.startswith(("agent", "sync"))])
        assert not agent.app[MQTT].connected
        status, _ = await agent.get("/healthz")
        assert status == 200
        assert cause in (agent.app[MQTT].status.last_error or "")
    toml = tmp_path / f"{device}.toml"
    toml.write_text(f'state_dir = "{tmp_path / device}"\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
                    f'tls = true\nca_file = "{pki.ca}"\ncert_file = "{pki.cert(device)}"\n'
                    f'key_file = "{pki.key(device)}"\ndevice_id = "{device}"\n')
    done = run_cli("doctor", "--config", str(toml))
    assert done.returncode == 1
    line = next(ln for ln in done.stdout.splitlines() if cause in ln)
    assert "FAIL" in line.upper() or "✗" in line, done.stdout
