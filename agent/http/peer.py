"""Who is on the other end of an HTTP request, as TLS proved it: the verified client
certificate's subject.

Only a certificate the handshake verified against ``server.tls_client_ca_file`` counts
(`ssl.SSLObject.getpeercert` gives nothing for an unverified or absent one). What the
subject may do is decided by the request gate (security/identity.py), not here.
"""

from __future__ import annotations

import ssl
from typing import Any

from aiohttp import web


def subject_common_name(certificate: dict[str, Any] | None) -> str | None:
    """The last commonName of a `getpeercert()` subject (the most specific one), or None."""
    if not certificate:
        return None
    names = [value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"]
    return names[-1] if names else None


def peer_subject(request: web.BaseRequest) -> str | None:
    """The subject CN of the client certificate verified on this request's connection, None
    when the connection is plain, sent no certificate, or is gone."""
    transport = request.transport
    if transport is None:
        return None
    connection = transport.get_extra_info("ssl_object")
    if not isinstance(connection, (ssl.SSLObject, ssl.SSLSocket)):
        return None
    return subject_common_name(connection.getpeercert())
