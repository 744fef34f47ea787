"""TLS client contexts for connections the agent opens (the MQTT broker).

One place decides verification: the server's certificate is always checked
against `ca_file` (or the system trust store) and its host name; a client
certificate is added when the broker authenticates devices by certificate.
"""

from __future__ import annotations

import ssl


def client_context(ca_file: str | None = None, cert_file: str | None = None,
                   key_file: str | None = None) -> ssl.SSLContext:
    """A verifying TLS 1.2+ client context; raises ValueError naming the file that failed."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"ca_file {ca_file}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cert_file {cert_file} / key_file {key_file}: {exc}") from None
    return context
