"""The TLS server side of the HTTPS front doors, the client proxy's local port and the gateway."""

from __future__ import annotations

import ssl


def http11_server_context() -> ssl.SSLContext:
    """TLS 1.2 or newer, ALPN http/1.1 only, and no session tickets. The caller loads the certificate.

    Only http/1.1 is offered, never h2: SPDY upgrades (exec, port-forward) need HTTP/1.1.

    No TLS 1.3 session tickets are sent; OpenSSL otherwise sends two after each handshake. kubectl
    keeps no session cache (client-go sets no ClientSessionCache), so nobody resumes with them, and
    they cost 240 of the 590 µs of server CPU per handshake. That was measured with OpenSSL 3.0.19,
    P-256 and a client certificate, over 3 × 500 handshakes (docs/performance.md).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.num_tickets = 0
    return context
