"""Why a TLS broker will not take this device: its certificate's dates, and the handshake's answer.

paho only says "connection lost" when a broker refuses a client certificate: with TLS 1.3
the broker judges the certificate after the client's handshake has finished, and its alert
(``certificate revoked``, ``certificate expired``, ``unknown CA``) arrives on the first read.
`handshake_outcome` makes that handshake alone, reads once, and names the alert; a broker
that accepted the certificate waits for MQTT's CONNECT, so a quiet read means accepted.
`certificate_dates` reads the local certificate's validity, so an expired one is named
before any network. Used by the agent's link (agent/fleet/link.py) and `edgefleet doctor`.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

#: the alerts a broker sends about our certificate, in words an operator acts on
ALERTS = {
    "CERTIFICATE_REVOKED": "certificate revoked (the broker's CRL lists it)",
    "CERTIFICATE_EXPIRED": "certificate expired",
    "UNKNOWN_CA": "the broker does not trust the CA that signed this device's certificate",
    "BAD_CERTIFICATE": "the broker rejected the certificate as bad",
    "CERTIFICATE_REQUIRED": "the broker requires a client certificate and none was sent",
    "HANDSHAKE_FAILURE": "the TLS handshake failed (no common protocol or cipher, or a certificate refused)",
}


@dataclass(frozen=True)
class CertificateDates:
    subject: str
    not_before: dt.datetime
    not_after: dt.datetime

    def problem(self, now: dt.datetime | None = None) -> str | None:
        """Why the certificate cannot be used now (expired, not yet valid), or None."""
        now = now or dt.datetime.now(dt.UTC)
        if now > self.not_after:
            return f"expired on {self.not_after:%Y-%m-%d %H:%M} UTC"
        if now < self.not_before:
            return f"not valid before {self.not_before:%Y-%m-%d %H:%M} UTC"
        return None


def certificate_dates(cert_file: str | Path) -> CertificateDates:
    """The subject CN and validity of the first certificate in a PEM file; ValueError when unreadable."""
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{cert_file}: not a readable PEM certificate ({exc})") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = str(names[0].value) if names else cert.subject.rfc4514_string()
    return CertificateDates(subject, cert.not_valid_before_utc, cert.not_valid_after_utc)


def describe(exc: ssl.SSLError | OSError) -> str:
    """An SSL error (the peer's alert, or our own verification's failure) in words."""
    reason = getattr(exc, "reason", None) or ""
    for code, words in ALERTS.items():
        if code in reason:
            return f"{words} [{reason}]"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the broker's certificate did not verify: {exc.verify_message}"
    return str(reason or exc.strerror or exc)


def handshake_outcome(host: str, port: int, context: ssl.SSLContext, timeout_s: float = 5.0,
                      settle_s: float = 1.0) -> str | None:
    """None when the broker took our certificate; else why not (its alert, in words). Raises
    OSError when the broker cannot be reached at all."""
    with socket.create_connection((host, port), timeout=timeout_s) as raw:
        try:
            tls = context.wrap_socket(raw, server_hostname=host)
        except (ssl.SSLError, ssl.CertificateError) as exc:  # TLS 1.2 alerts, or the broker's cert
            return describe(exc)
        with tls:
            tls.settimeout(settle_s)
            try:
                data = tls.recv(1)
            except TimeoutError:
                return None  # it waits for our CONNECT: the certificate was accepted
            except ssl.SSLError as exc:
                return describe(exc)
            except ConnectionResetError:
                return "the broker reset the connection after the handshake"
            return None if data else "the broker closed the connection after the TLS handshake"
