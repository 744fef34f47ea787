"""Who is on the other end of a gRPC call, as TLS proved it: the verified client
certificate's subject CN, from grpc's auth context.

grpc fills ``x509_common_name`` only for a certificate its handshake verified (the
server requires one when ``server.tls_client_cert`` is "required"; see
security/tls_server.py). What the subject may do is the request gate's business.
"""

from __future__ import annotations

import grpc


def grpc_peer_subject(context: grpc.ServicerContext | grpc.aio.ServicerContext) -> str | None:
    """The subject CN of the call's verified client certificate, None when there is none."""
    auth = context.auth_context() or {}
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    names = auth.get("x509_common_name") or []
    return names[-1].decode("utf-8", "replace") if names else None
