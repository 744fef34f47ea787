"""`edgefleet doctor`'s TLS check: can the endpoint's certificate files be used, and does the
running agent serve the certificate they hold?

The files are checked by the same code the agent runs at start and at SIGHUP
(security/tls_server.py `load_tls`), so a pass here means the agent accepts them. A
reload that refused the files leaves the agent serving the certificate it had: doctor
sees that by reading the certificate the running agent presents (a handshake that trusts
nothing and sends nothing but the configured CLI certificate; only the certificate is
read) and comparing it with the file's.
"""

from __future__ import annotations

import datetime
import socket
import ssl
from pathlib import Path

from cryptography import x509

from agent.cli.findings import Finding, Level
from agent.config import AgentConfig, ServerConfig
from runtime.state_lock import holder
from security.tls_server import TlsFiles, TlsFilesError, load_tls

#: A certificate that expires sooner than this is a warning.
EXPIRY_WARN = datetime.timedelta(days=14)
#: The longest the handshake with the running agent may take.
TIMEOUT_S = 5.0
FIX_FILES = ("fix the file, then `systemctl reload edgefleet` (SIGHUP); until then a running agent keeps "
             "the certificate it loaded before")


def _describe(certificate: x509.Certificate) -> str:
    return f"serial {certificate.serial_number:x}, valid until {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"


def served_certificate(server: ServerConfig) -> x509.Certificate:
    """The certificate the agent listening at server.host:server.port presents (OSError,
    ssl.SSLError when it cannot be read)."""
    host = "127.0.0.1" if server.host in ("", "0.0.0.0") else "::1" if server.host == "::" else server.host
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # read, not trusted: it is compared with the file's
    if server.tls_cli_cert_file is not None:
        context.load_cert_chain(server.tls_cli_cert_file, server.tls_cli_key_file)
    with socket.create_connection((host, server.port), timeout=TIMEOUT_S) as raw, \
            context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    if der is None:
        raise ssl.SSLError("the agent presented no certificate")
    return x509.load_der_x509_certificate(der)


def check_tls(config: AgentConfig, now: datetime.datetime | None = None) -> list[Finding]:
    server = config.server
    if server.tls_cert_file is None or server.tls_key_file is None:
        return [Finding(Level.OK, "tls", "off: the HTTP (and gRPC) port speaks plain text "
                        "(set server.tls_cert_file and tls_key_file to turn TLS on)")]
    now = now or datetime.datetime.now(datetime.UTC)
    findings = []
    certificate: x509.Certificate | None = None
    try:
        loaded = load_tls(TlsFiles(server.tls_cert_file, server.tls_key_file, server.tls_client_ca_file,
                                   server.client_cert_mode))
    except TlsFilesError as exc:
        findings.append(Finding(Level.FAIL, "tls", str(exc), FIX_FILES))
    else:
        certificate = loaded.certificate
        detail = f"{server.tls_cert_file}: {_describe(certificate)}; client certificates: {server.client_cert_mode}"
        if certificate.not_valid_after_utc <= now:
            findings.append(Finding(Level.FAIL, "tls", f"{detail}: expired", "renew the certificate, then "
                                    "`systemctl reload edgefleet`: clients refuse an expired one"))
        elif certificate.not_valid_after_utc - now < EXPIRY_WARN:
            findings.append(Finding(Level.WARN, "tls", f"{detail}: expires soon", "renew the certificate, then "
                                    "`systemctl reload edgefleet`"))
        else:
            findings.append(Finding(Level.OK, "tls", detail))
    running = holder(Path(config.state_dir))
    if not running or not running[0]:
        return findings
    try:
        served = served_certificate(server)
    except (OSError, ssl.SSLError, ValueError) as exc:
        findings.append(Finding(Level.WARN, "tls", f"cannot read the certificate the running agent "
                                f"(pid {running[0]}) presents on port {server.port}: {exc}",
                                "check that it listens with TLS (its log says https://)"))
        return findings
    if certificate is not None and served.serial_number == certificate.serial_number:
        findings.append(Finding(Level.OK, "tls", f"the running agent (pid {running[0]}) serves this certificate"))
    elif certificate is None:
        findings.append(Finding(Level.WARN, "tls", f"the running agent (pid {running[0]}) keeps serving the "
                                f"certificate it loaded before: {_describe(served)}"))
    else:
        findings.append(Finding(Level.WARN, "tls", f"the running agent (pid {running[0]}) serves another "
                                f"certificate than the file: {_describe(served)}",
                                "`systemctl reload edgefleet` (SIGHUP) makes it load the file; its log says "
                                "why when it refuses"))
    return findings
