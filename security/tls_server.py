"""TLS for the agent's own endpoint (HTTP and gRPC), and the context our CLI uses to reach it.

security/tls.py is the client side for connections the agent opens (the broker); this
module is the server side of the local endpoint. The crypto is stdlib `ssl` (what
aiohttp serves with) and grpc's own TLS; nothing here is hand-written crypto.

One generation of certificate material (`load_tls`) is read from the configured
files, checked completely (every file readable, the key matching the certificate,
the client CA parseable) and turned into a TLS 1.2+ `ssl.SSLContext` plus the PEM
bytes grpc wants. `ServerTls` holds the current generation and swaps it on
`reload` (SIGHUP) without touching a connection:

- HTTP: the listening socket keeps one context whose ``sni_callback`` (called for
  every handshake, with or without SNI) points the new connection at the current
  generation's context, so new handshakes get the new certificate and established
  connections go on as they are;
- gRPC: `grpc.dynamic_ssl_server_credentials` asks `ServerTls` before each
  handshake whether the certificate changed.

A generation that fails its checks raises `TlsFilesError`, naming the file and the
reason in one line; at reload the running generation stays and the error is kept in
`ServerTls.last_error`. Client certificates: ``required`` refuses a handshake without
a valid one from ``tls_client_ca_file``; ``optional`` (HTTP only: grpc's Python API
can only require one or not ask) verifies one when it is sent. Who the verified
subject is allowed to be is the request gate's business (agent/http/peer.py and
agent/kserve/peer.py only read it).
"""

from __future__ import annotations

import datetime
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # cryptography is imported once TLS is configured (the functions below), grpc by its server
    import grpc
    from cryptography import x509

ClientCertMode = Literal["off", "optional", "required"]


class TlsFilesError(ValueError):
    """A certificate, key or CA file cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class TlsFiles:
    """Where the endpoint's certificate material lives (``[server] tls_*``)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    client_cert: ClientCertMode = "off"


@dataclass(frozen=True)
class LoadedTls:
    """One checked generation of certificate material."""

    context: ssl.SSLContext
    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None
    #: The leaf certificate (the first in cert_file).
    certificate: x509.Certificate

    @property
    def serial(self) -> int:
        return self.certificate.serial_number

    @property
    def not_after(self) -> datetime.datetime:
        return self.certificate.not_valid_after_utc


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise TlsFilesError(f"server.{key} {path}: no such file") from None
    except IsADirectoryError:
        raise TlsFilesError(f"server.{key} {path}: is a directory, not a PEM file") from None
    except OSError as exc:
        raise TlsFilesError(f"server.{key} {path}: cannot read it: {exc.strerror}") from None


def _certificates(key: str, path: str, pem: bytes) -> list[x509.Certificate]:
    from cryptography import x509

    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certificates = []
    if not certificates:
        raise TlsFilesError(f"server.{key} {path}: no PEM certificate in it")
    return certificates


def load_tls(files: TlsFiles) -> LoadedTls:
    """Read and check `files` into a server context (TLS 1.2+); TlsFilesError otherwise."""
    from cryptography.hazmat.primitives import serialization

    cert_pem = _read("tls_cert_file", files.cert_file)
    key_pem = _read("tls_key_file", files.key_file)
    leaf = _certificates("tls_cert_file", files.cert_file, cert_pem)[0]
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TlsFilesError(f"server.tls_key_file {files.key_file}: the key is encrypted; give the agent "
                            "an unencrypted key that only its user can read (mode 0600)") from None
    except ValueError:
        raise TlsFilesError(f"server.tls_key_file {files.key_file}: not a PEM private key") from None
    if private_key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo) != \
            leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise TlsFilesError(f"server.tls_key_file {files.key_file} does not match the certificate in "
                            f"server.tls_cert_file {files.cert_file}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(files.cert_file, files.key_file)
    except (OSError, ssl.SSLError) as exc:  # changed under us between the reads, or a chain OpenSSL refuses
        raise TlsFilesError(f"server.tls_cert_file {files.cert_file} / tls_key_file {files.key_file}: "
                            f"{getattr(exc, 'reason', None) or exc}") from None
    client_ca_pem = None
    if files.client_ca_file is not None and files.client_cert != "off":
        client_ca_pem = _read("tls_client_ca_file", files.client_ca_file)
        _certificates("tls_client_ca_file", files.client_ca_file, client_ca_pem)
        try:
            context.load_verify_locations(cadata=client_ca_pem.decode("ascii"))
        except (UnicodeDecodeError, ssl.SSLError) as exc:
            raise TlsFilesError(f"server.tls_client_ca_file {files.client_ca_file}: "
                                f"{getattr(exc, 'reason', None) or exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED if files.client_cert == "required" else ssl.CERT_OPTIONAL
    return LoadedTls(context, cert_pem, key_pem, client_ca_pem, leaf)


class ServerTls:
    """The endpoint's current certificate material, swapped by `reload` for new handshakes only."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.current = load_tls(files)
        #: The context the HTTP socket listens with: the first generation's, plus the switch.
        self.http_context = self.current.context
        self.http_context.sni_callback = self._use_current
        #: Why the last reload was refused (None after a good one).
        self.last_error: str | None = None
        self._grpc_lock = threading.Lock()
        self._grpc_served = self.current

    def _use_current(self, connection: ssl.SSLObject, server_name: str | None,
                     context: ssl.SSLContext) -> None:
        current = self.current.context
        if connection.context is not current:
            connection.context = current

    def reload(self) -> LoadedTls:
        """Re-read the files (blocking: run it off the event loop). A generation that fails its
        checks raises TlsFilesError and the current one stays in use."""
        try:
            new = load_tls(self.files)
        except TlsFilesError as exc:
            self.last_error = str(exc)
            raise
        self.current, self.last_error = new, None
        return new

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Server credentials that take a reloaded certificate at the next handshake."""
        import grpc

        return grpc.dynamic_ssl_server_credentials(
            self._grpc_config(self.current), self._grpc_fetch,
            require_client_authentication=self.files.client_cert == "required")

    @staticmethod
    def _grpc_config(loaded: LoadedTls) -> grpc.ServerCertificateConfiguration:
        import grpc

        return grpc.ssl_server_certificate_configuration([(loaded.key_pem, loaded.cert_pem)],
                                                         root_certificates=loaded.client_ca_pem)

    def _grpc_fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's question before each handshake (on its own threads): a new config, or None."""
        with self._grpc_lock:
            current = self.current
            if current is self._grpc_served:
                return None
            self._grpc_served = current
        return self._grpc_config(current)


def local_client_context(cert_file: str, client_cert_file: str | None = None,
                         client_key_file: str | None = None) -> ssl.SSLContext:
    """How `edgefleet` commands on this machine reach the local endpoint over TLS: they trust
    exactly the agent's own certificate (the first in its `cert_file`, not its issuers, so no
    other certificate passes and the names in it do not matter), and present a client
    certificate when one is configured. ValueError naming the file that failed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        pem = Path(cert_file).read_bytes()
        leaf = x509.load_pem_x509_certificates(pem)[0]
    except OSError as exc:
        raise ValueError(f"server.tls_cert_file {cert_file}: cannot read it: {exc.strerror}") from None
    except (ValueError, IndexError):
        raise ValueError(f"server.tls_cert_file {cert_file}: no PEM certificate in it") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # the pin below is exact: one certificate, whatever its names
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a leaf as the trust anchor
    context.load_verify_locations(cadata=leaf.public_bytes(serialization.Encoding.PEM).decode("ascii"))
    if client_cert_file is not None:
        try:
            context.load_cert_chain(client_cert_file, client_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"server.tls_cli_cert_file {client_cert_file} / tls_cli_key_file "
                             f"{client_key_file}: {getattr(exc, 'reason', None) or exc}") from None
    return context
